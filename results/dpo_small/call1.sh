#!/bin/bash
# Issue 12, GPU call 1: DPO of the shipped needle model on multikey, where SFT misses (26% at 4k, 20% at 16k).
# Pairs: needle.py --pairs at 4k and 16k (60 per cell; rejected = the model's own wrong answer where it errs),
# two learning rates, each evaluated SFT vs DPO on the same multikey samples at 4k, 16k and 32k (32k: beyond
# the pairs), then single at 4k/16k/32k on each DPO model (does single regress?).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
python3 needle.py --pairs --ckpt=checkpoints/infinitecontext-small --variant=multikey --lengths=4k,16k \
  --depths=0,25,50,75,100 --samples=60 --out=/tmp/r/pairs_multikey.jsonl 2>&1 | grep -v Warn | tail -3
for run in "a 1e-4" "b 3e-4"; do
  set -- $run
  timeout -s TERM 200 python3 dpo.py --ckpt=checkpoints/infinitecontext-small --pairs=/tmp/r/pairs_multikey.jsonl \
    --variants=multikey --beta=0.1 --loss_type=sigmoid --lr=$2 --min_lr=1e-5 --warmup_iters=10 --max_iters=120 \
    --batch_size=4 --grad_accum=2 --compile=False --log_interval=10 --eval_lengths=4k,16k,32k --eval_samples=10 \
    --out_dir=/tmp/dpo_$1 --results=/tmp/r/dpo_small_$1.json 2>&1 | grep -v Warn | tail -22
  cp /tmp/dpo_$1/log.jsonl /tmp/r/dpo_small_$1_log.jsonl
  python3 needle.py --ckpt=/tmp/dpo_$1/ckpt.pt --variant=single --lengths=4k,16k,32k --depths=0,25,50,75,100 \
    --samples=10 --out=/tmp/r/dpo_small_$1_single.json 2>&1 | tail -1
  python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/dpo_$1/ckpt.pt'), '$OUT/hf_$1')"
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/dpo_call1.tar.gz -C /tmp/r . && ls -la $OUT $OUT/*
