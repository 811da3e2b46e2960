# Instruction tuning (SFT) of the newest pretraining-kind checkpoint under out/ (out/mid after
# config/mid.py, else out/pretrain_1b) on SmolTalk; with the multiple-choice questions as chat
# turns: prepare data/smoltalk_mc (below) and add --data_dir=data/smoltalk_mc.
# Prepare with the SAME tokenizer as the pretraining data (train.py refuses another one):
#   python data.py --sft --source smoltalk --max_shards 1 --tokenizer data/tok --out data/smoltalk
#   python data.py --sft --source smoltalk mmlu-aux commonsenseqa --max_shards 1 \
#       --tokenizer data/tok --out data/smoltalk_mc
# Launch:  python train.py config/sft.py            (1 GPU: 8 accumulation steps)
#          torchrun --nproc_per_node=8 train.py config/sft.py
# Batch: 8 packed rows x 2048 tokens x 8 GPUs x 1 = 131,072 tokens per step (padding included);
#   the loss is the mean over the assistant tokens of the whole step, on all micro-steps and GPUs.
out_dir = "out/sft"
stage = "sft"
init_from = "pretrain"          # the newest pretraining-kind checkpoint under out/ (mid's, when
                                # config/mid.py ran after pretraining); or a path
data_dir = "data/smoltalk"
block_size = 2048
batch_size = 8
total_batch_tokens = 131_072
max_iters = 2000
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 50
weight_decay = 0.0
eval_interval = 250
eval_iters = 2
ckpt_interval = 500
log_interval = 10
sft_samples = 3
