#!/bin/bash
# Issue 12, GPU call 2. Call 1's plain DPO (lr 1e-4 and 3e-4, beta 0.1) fell from 15% to 1% on multikey: the
# margin grew by lowering both answers and the model stopped copying from the context (fluent made-up values).
# Now with RPO's NLL term on the chosen answer (--rpo_alpha=1), on call 1's 600 pairs (carried in .gpu/),
# and one gentle plain-DPO run; SFT vs DPO on the same multikey samples at 4k/16k/32k, then single.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
for run in "c 1e-4 0.1 1.0" "d 3e-5 0.1 1.0" "e 1e-5 0.1 0.0"; do
  set -- $run
  timeout -s TERM 200 python3 dpo.py --ckpt=checkpoints/infinitecontext-small --pairs=.gpu/pairs_multikey.jsonl \
    --variants=multikey --beta=$3 --rpo_alpha=$4 --loss_type=sigmoid --lr=$2 --min_lr=$2 --warmup_iters=10 \
    --max_iters=120 --batch_size=4 --grad_accum=2 --compile=False --log_interval=20 --eval_lengths=4k,16k,32k \
    --eval_samples=10 --out_dir=/tmp/dpo_$1 --results=/tmp/r/dpo_small_$1.json 2>&1 | grep -v Warn | tail -12
  cp /tmp/dpo_$1/log.jsonl /tmp/r/dpo_small_$1_log.jsonl
  python3 needle.py --ckpt=/tmp/dpo_$1/ckpt.pt --variant=single --lengths=4k,16k,32k --depths=0,25,50,75,100 \
    --samples=10 --out=/tmp/r/dpo_small_$1_single.json 2>&1 | tail -1
  python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/dpo_$1/ckpt.pt'), '$OUT/hf_$1')"
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/dpo_call2.tar.gz -C /tmp/r . && ls -la $OUT
