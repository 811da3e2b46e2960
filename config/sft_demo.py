# SFT of the demo model (out/demo, from config/demo.py) on the demo chat set, CPU, a few minutes.
#   python data.py --sft --input data/demo_raw/chat.jsonl --tokenizer data/demo_tok \
#       --out data/demo_chat
#   python train.py config/sft_demo.py
#   python sample.py --ckpt out/sft_demo --chat
# Batch: 8 packed rows x 256 tokens x 1 process x 1 micro-step = 2,048 tokens per step.
out_dir = "out/sft_demo"
stage = "sft"
init_from = "out/demo"
data_dir = "data/demo_chat"
block_size = 256
batch_size = 8
total_batch_tokens = 2048
max_iters = 200
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 10
weight_decay = 0.0
eval_interval = 50
eval_iters = 2
ckpt_interval = 100
log_interval = 10
sft_samples = 3
sft_max_new_tokens = 48
