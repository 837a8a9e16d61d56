#!/bin/bash
# Issue 12, GPU call 3. Call 2's gentle plain DPO (run e: lr 1e-5, beta 0.1, multikey pairs at 4k/16k) lifted
# single at 32k from 0% to 90% and multikey at 32k from 0% to 12% (lengths beyond the pairs), but multikey fell at
# 4k/16k (26 -> 14%, 20 -> 10%). Now: pairs where SFT misses on single too (32k, 100 pairs, the model's own
# letter soup as rejected) added to the 600 multikey pairs, run e's settings (f); then the 4k-128k grid,
# single and multikey, on e and f (the SFT grid is results/needle_small_*.json: the same samples, seed 0).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
python3 needle.py --pairs --ckpt=checkpoints/infinitecontext-small --variant=single --lengths=32k \
  --depths=0,25,50,75,100 --samples=20 --out=/tmp/r/pairs_single32k.jsonl 2>&1 | grep -v Warn | tail -1
cat .gpu/pairs_multikey.jsonl /tmp/r/pairs_single32k.jsonl > /tmp/pairs_mix.jsonl
for run in "f 0.0"; do
  set -- $run
  timeout -s TERM 230 python3 dpo.py --ckpt=checkpoints/infinitecontext-small --pairs=/tmp/pairs_mix.jsonl \
    --variants=multikey --beta=0.1 --rpo_alpha=$2 --loss_type=sigmoid --lr=1e-5 --min_lr=1e-5 --warmup_iters=10 \
    --max_iters=120 --batch_size=2 --grad_accum=4 --compile=False --log_interval=40 --eval_samples=0 \
    --out_dir=/tmp/dpo_$1 2>&1 | grep -v Warn | tail -5
  cp /tmp/dpo_$1/log.jsonl /tmp/r/dpo_small_$1_log.jsonl
  python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/dpo_$1/ckpt.pt'), '$OUT/hf_$1')"
done
for m in "e .gpu/hf_e" "f $OUT/hf_f"; do
  set -- $m
  for v in single multikey; do
    timeout 60 python3 needle.py --ckpt=$2 --variant=$v --lengths=4k,16k,32k,128k --depths=0,25,50,75,100 \
      --samples=10 --out=/tmp/r/grid_$1_$v.json 2>&1 | tail -1
  done
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png /tmp/r/pairs_single32k.jsonl
tar -czf $OUT/dpo_call3.tar.gz -C /tmp/r . && ls -la $OUT
