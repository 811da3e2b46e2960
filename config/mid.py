# The multiple-choice stage between pretraining and SFT (issue 16): a short run from the end of
# out/pretrain_1b on 4-choice questions in the plain-text layout that eval_mmlu.py and lm-eval
# score, mixed half and half with the pretraining data so the rest of what the model knows stays.
# Prepare (the SAME tokenizer as pretraining; the questions are 13-gram decontaminated against
# MMLU's test set, counts in data/mc/meta.json):
#   python data.py --source mmlu-aux commonsenseqa --tokenizer data/tok --out data/mc
#   (mmlu-aux already holds ARC's and OpenBookQA's train questions: adding those presets twice-counts)
# Launch:  torchrun --nproc_per_node=8 train.py config/mid.py
# Then SFT: config/sft.py's init_from="pretrain" takes the newest pretraining-kind checkpoint under
#   out/, which is this run's (a mid run is a pretraining run on other data: stage "pretrain").
# Batch: 8 sequences x 2048 tokens x 8 GPUs x 4 accumulation steps = 524,288 tokens per step.
# Budget: mmlu-aux and commonsenseqa hold ~110K questions after decontamination, ~14M tokens; 150 steps =
#   79M tokens, half of them questions: ~2.5 passes over them (nanochat's midtraining: about one
#   pass over a larger mix).
out_dir = "out/mid"
init_from = "out/pretrain_1b"   # its newest checkpoint; weights only, a fresh optimizer
data_dir = "data/mc:0.5,data/fineweb-edu:0.5"
model = "1b"
block_size = 2048
batch_size = 8
total_batch_tokens = 524_288
max_iters = 150
learning_rate = 1e-4            # a quarter of pretraining's peak: the model is already trained
min_lr = 1e-5
warmup_iters = 10
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
eval_interval = 50
eval_iters = 4
ckpt_interval = 50
log_interval = 10
