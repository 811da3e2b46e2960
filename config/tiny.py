# Tiny run for tests and smoke checks: a ~0.1M-parameter model, seconds on CPU.
#   python train.py config/tiny.py --data_dir=DIR            (DIR from data.py, any small tokenizer)
#   python -m torch.distributed.run --standalone --nproc_per_node=2 train.py config/tiny.py \
#       --data_dir=DIR
# Batch: 4 sequences x 64 tokens x world_size x grad_accum = 512 tokens per step
#   (grad_accum 2 on 1 process, 1 on 2 processes: the same run).
out_dir = "out/tiny"
model = "tiny"
max_seq_len = 128
block_size = 64
batch_size = 4
total_batch_tokens = 512
max_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 5
weight_decay = 0.0
eval_interval = 10
eval_iters = 2
ckpt_interval = 10
log_interval = 1
device = "cpu"
compile = False
