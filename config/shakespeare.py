# Tiny-shakespeare on CPU: a 4-layer demo-width model, a few minutes on 2 cores.
# Prepare (tokenizer and shards, ~1 minute):
#   python bpe.py --input ../shared/data/tinyshakespeare.txt --vocab_size 1024 \
#       --out data/shakespeare_tok
#   python data.py --input ../shared/data/tinyshakespeare.txt --txt_separator '\n\n' \
#       --val_fraction 0.05 --tokenizer data/shakespeare_tok --out data/shakespeare
# Train, then sample:
#   python train.py config/shakespeare.py
#   python sample.py --ckpt out/shakespeare --prompt "ROMEO:"
# Batch: 8 sequences x 256 tokens x 1 process x 1 micro-step = 2,048 tokens per step;
#   500 steps = 1M tokens (~3 epochs of the ~330k-token corpus).
out_dir = "out/shakespeare"
data_dir = "data/shakespeare"
model = "demo"
n_layer = 4
block_size = 256
batch_size = 8
total_batch_tokens = 2048
max_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 4
ckpt_interval = 250
log_interval = 10
