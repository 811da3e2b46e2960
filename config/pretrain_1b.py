# The ~1.1B-parameter Llama-style model (TinyLlama's shape, preset '1b') on FineWeb-Edu, 8 x H100.
# Prepare: python data.py --source fineweb-edu --tokenizer data/tok --out data/fineweb-edu
#          after a tokenizer: python bpe.py --input 'PARQUET_FILES' --vocab_size 32768 \
#              --out data/tok --max_chars 2_000_000_000
# Launch:  torchrun --nproc_per_node=8 train.py config/pretrain_1b.py
# Plan:    python train.py config/pretrain_1b.py --plan --plan_gpus=8
#
# Batch: 8 sequences x 2048 tokens x 8 GPUs = 131,072 tokens per micro-step; x 4 accumulation steps
#   = 524,288 (2^19) tokens per optimizer step. On 1 GPU the same run takes 32 accumulation steps.
# Budget: 1.126B parameters x ~20 tokens/parameter (Chinchilla) = 22.5B tokens
#   = 43,000 steps x 524,288.
#   fineweb-edu's sample/10BT holds ~10B tokens: this is ~2.3 epochs of it (or prepare more data).
# Memory per GPU (see --plan): 18 GB weights + grads + AdamW, ~36 GB activations at micro-batch 8
#   (Muon keeps one buffer per block matrix where AdamW keeps two: ~4 GB less).
out_dir = "out/pretrain_1b"
data_dir = "data/fineweb-edu"
model = "1b"
block_size = 2048
batch_size = 8
total_batch_tokens = 524_288
max_iters = 43_000
# Schedule: warmup-stable-decay, nanochat's shape (karpathy/nanochat scripts/base_train.py
#   @ 00255c1: --warmup-steps 40 --warmdown-ratio 0.65 --final-lr-frac 0.05): a short warmup, the
#   learning rate flat until 35% of the run (step 15,050), then a linear decay to 5% over the last
#   65%. Warmup is 200 steps (0.5%), not 40: nanochat's blocks norm q and k, kiln's do not. Any
#   checkpoint of the flat phase can start a decay on another data mix (README: "Branch the decay").
learning_rate = 4e-4
min_lr = 2e-5
warmup_iters = 200
schedule = "wsd"
decay_frac = 0.65
weight_decay = 0.1
# Muon on the block matrices (muon_lr, width-independent: optim.py), AdamW at learning_rate on
#   embeddings, lm_head and norms; Muon won bench/bench_optim.py at equal time (BENCHMARKS.md)
optimizer = "muon"
muon_lr = 0.02
grad_clip = 1.0
eval_interval = 1000
eval_iters = 4
ckpt_interval = 1000
log_interval = 10
plan_gpus = 8
