# Demo pretraining on CPU in minutes: the ~9M-parameter 'demo' model on the demo corpus
# (make demo builds it).
#   python train.py config/demo.py
#   python train.py config/demo.py --init_from=resume          # continue after Ctrl-C
# Batch: 8 sequences x 256 tokens x 1 process x 1 micro-step = 2,048 tokens per step;
#   300 steps = 0.6M tokens (a demo, not a converged model: ~0.07 tokens per parameter).
out_dir = "out/demo"
data_dir = "data/demo"
model = "demo"
block_size = 256
batch_size = 8
total_batch_tokens = 2048
max_iters = 300
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
weight_decay = 0.1
# Muon on the block matrices, AdamW (learning_rate) on embeddings, lm_head and norms: on this model
#   it reached a lower held-out loss than AdamW at equal time in 3 of 3 seeds (BENCHMARKS.md)
optimizer = "muon"
muon_lr = 0.02
eval_interval = 100
eval_iters = 4
ckpt_interval = 100
log_interval = 10
