# The demo's multiple-choice stage (config/mid.py at demo size): from out/demo, the demo world's
# 4-choice questions in the plain-text layout that eval_mmlu.py scores, half and half with the
# pretraining text; CPU, a minute.
#   python data.py --input data/demo_raw/mc.jsonl --tokenizer data/demo_tok --out data/demo_mc \
#       --val_fraction 0.05
#   python train.py config/mid_demo.py
#   python eval_mmlu.py --ckpt out/mid_demo --data data/demo_raw/mmlu --shots 0
# Batch: 16 sequences x 128 tokens x 1 process x 1 micro-step = 2,048 tokens per step.
out_dir = "out/mid_demo"
init_from = "out/demo"
data_dir = "data/demo_mc:0.5,data/demo:0.5"
block_size = 128
batch_size = 16
total_batch_tokens = 2048
max_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
weight_decay = 0.1
eval_interval = 50
eval_iters = 4
ckpt_interval = 50
log_interval = 10
