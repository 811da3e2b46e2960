# kiln: `make test` runs the test suite, `make demo` runs the whole pipeline on a built-in corpus on CPU.
# Both create .venv on first use. Python 3.11+ is the only thing the machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-demo

venv: $(STAMP)

# Installing torch first (its pin from requirements.txt) keeps any other package from pulling a different torch build.
$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$$(grep '^torch==' requirements.txt)"
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ---- make demo: the whole pipeline on a built-in corpus (demo.py world), on CPU, in minutes.
# Every stage writes a file that the next one needs; a stage whose file exists is skipped, so a second `make demo`
# resumes where the first stopped (an interrupted pretraining continues from its newest checkpoint).
# `make clean-demo` removes everything it made. Stage times go to out/demo/timings.tsv, read by demo.py report.
DEMO_SEED ?= 0
DEMO_RAW := data/demo_raw
DEMO_TOK := data/demo_tok
DEMO_DATA := data/demo
DEMO_MC := data/demo_mc
DEMO_CHAT := data/demo_chat
DEMO_OUT := out/demo
DEMO_SFT := out/sft_demo
DEMO_TIMES := $(DEMO_OUT)/timings.tsv
# Sizes for 2 CPU cores: the world's, the tokenizer's, and overrides of config/demo.py and config/sft_demo.py.
# 64 people; of each one's six askable facts 4 are asked as 4-choice questions in training, 1 is stated only in
# chat answers, 1 only in prose (demo_world.py). Pretraining reads the prose with 15% of 4-choice questions in
# the plain-text layout (the mid stage's data, mixed in: cheaper than a stage of its own on 2 cores).
DEMO_WORLD_ARGS ?= --seed $(DEMO_SEED) --people 64 --docs 8000 --mc_facts 4 --mc_copies 3
DEMO_VOCAB ?= 2048
DEMO_PRETRAIN_ARGS ?= --data_dir=$(DEMO_DATA):0.85,$(DEMO_MC):0.15 --n_layer=4 --d_model=128 --block_size=128 \
	--batch_size=16 --total_batch_tokens=2048 --max_iters=400 --learning_rate=3e-3 --min_lr=3e-4 --eval_interval=100 \
	--ckpt_interval=100
DEMO_SFT_ARGS ?= --max_iters=250 --learning_rate=1e-3 --min_lr=1e-4 --batch_size=4 --block_size=256 \
	--total_batch_tokens=1024 --eval_interval=50 --ckpt_interval=50
DEMO_SAMPLE_ARGS ?= --temperature 0 --max_new_tokens 48

# $(call timed,STAGE,COMMAND): run COMMAND, then append "STAGE<tab>seconds" to the timings file.
timed = @mkdir -p $(DEMO_OUT) && t0=$$(date +%s.%N) && $(2) && \
	awk -v t0="$$t0" -v t1="$$(date +%s.%N)" 'BEGIN { printf "%s\t%.1f\n", "$(1)", t1 - t0 }' >> $(DEMO_TIMES)

demo: $(STAMP) $(DEMO_OUT)/report.md
	@cat $(DEMO_OUT)/report.md

$(DEMO_RAW)/world.json: | $(STAMP)
	$(call timed,world,$(BIN)/python demo.py world --out $(DEMO_RAW) $(DEMO_WORLD_ARGS))

$(DEMO_TOK)/bpe.json: | $(DEMO_RAW)/world.json
	$(call timed,tokenizer,$(BIN)/python bpe.py --input $(DEMO_RAW)/pretrain.jsonl --vocab_size $(DEMO_VOCAB) \
		--out $(DEMO_TOK))

$(DEMO_DATA)/meta.json: | $(DEMO_TOK)/bpe.json
	$(call timed,shards,$(BIN)/python data.py --input $(DEMO_RAW)/pretrain.jsonl --tokenizer $(DEMO_TOK) \
		--out $(DEMO_DATA) --val_fraction 0.02)

$(DEMO_MC)/meta.json: | $(DEMO_TOK)/bpe.json
	$(call timed,mc shards,$(BIN)/python data.py --input $(DEMO_RAW)/mc.jsonl --tokenizer $(DEMO_TOK) \
		--out $(DEMO_MC) --val_fraction 0.05)

$(DEMO_CHAT)/meta.json: | $(DEMO_TOK)/bpe.json
	$(call timed,sft data,$(BIN)/python data.py --sft --input $(DEMO_RAW)/chat.jsonl --tokenizer $(DEMO_TOK) \
		--out $(DEMO_CHAT) --mmlu_dir $(DEMO_RAW)/mmlu --max_len 256)

# A run with no checkpoint yet starts over (and drops the log of the attempt); one with checkpoints resumes.
train_stage = $(call timed,$(2),$(BIN)/python train.py $(3) --out_dir=$(1) \
	$$(ls -d $(1)/ckpt_* >/dev/null 2>&1 && echo --init_from=resume || rm -f $(1)/log.jsonl))

$(DEMO_OUT)/loss.png: | $(DEMO_DATA)/meta.json $(DEMO_MC)/meta.json
	$(call train_stage,$(DEMO_OUT),pretrain,config/demo.py $(DEMO_PRETRAIN_ARGS))

$(DEMO_SFT)/loss.png: | $(DEMO_OUT)/loss.png $(DEMO_CHAT)/meta.json
	$(call train_stage,$(DEMO_SFT),sft,config/sft_demo.py --init_from=$(DEMO_OUT) --data_dir=$(DEMO_CHAT) \
		$(DEMO_SFT_ARGS))

# The questions of each kind of fact scored as cloze (each answer's text as the continuation) on the pretrained model.
$(DEMO_OUT)/cloze.json: | $(DEMO_OUT)/loss.png
	$(call timed,cloze,$(BIN)/python eval_mmlu.py --ckpt $(DEMO_OUT) --data $(DEMO_RAW)/mmlu --method cloze \
		--shots 0 --out $(DEMO_OUT)/cloze.json)

$(DEMO_OUT)/mmlu.json: | $(DEMO_SFT)/loss.png
	$(call timed,multiple choice,$(BIN)/python eval_mmlu.py --ckpt $(DEMO_SFT) --data $(DEMO_RAW)/mmlu \
		--method letter --shots 0 --chat --out $(DEMO_OUT)/mmlu.json)

# Each question alone (/reset between them), greedy; the transcript is what the report card shows.
$(DEMO_OUT)/samples.txt: | $(DEMO_SFT)/loss.png
	$(call timed,chat,sed 's|$$|\n/reset|' $(DEMO_RAW)/prompts.txt | $(BIN)/python sample.py --ckpt $(DEMO_SFT) \
		--chat $(DEMO_SAMPLE_ARGS) > $(DEMO_OUT)/samples.tmp && mv $(DEMO_OUT)/samples.tmp $(DEMO_OUT)/samples.txt)

$(DEMO_OUT)/report.md: $(DEMO_OUT)/cloze.json $(DEMO_OUT)/mmlu.json $(DEMO_OUT)/samples.txt
	$(BIN)/python demo.py report --out $(DEMO_OUT) --sft $(DEMO_SFT) --world $(DEMO_RAW)

clean-demo:
	rm -rf $(DEMO_RAW) $(DEMO_TOK) $(DEMO_DATA) $(DEMO_MC) $(DEMO_CHAT) $(DEMO_OUT) $(DEMO_SFT)
