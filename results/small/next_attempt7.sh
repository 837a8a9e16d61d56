#!/bin/bash
# PREPARED, NOT YET RUN (for the next GPU session; see results/gpu_log.md for what ran).
# Issue 11, attempt 7, call 1: from the shipped model, real 8192-token windows (attempt 6: each longer real
# window moved the working range up, 1k -> 4k -> 16k), PoSE to 1M, multikey weighted x2; quick eval at 16k/32k.
# Call 2 then runs the grid: needle.py --lengths=4k,16k,32k,128k --depths=0,25,50,75,100 --samples=10 for
# single and multikey, and --lengths=1M --depths=0,50,100 --samples=5 (1M: ~25 s a sample on an H100).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
timeout -s TERM ${P7_S:-420} python3 train.py --init_from=checkpoints/infinitecontext-small --seq_len=8192 --batch_size=16 \
  --max_pos=1048576 --variants=single,multikey,multikey,multivalue,multiquery --haystacks=noise,essay,needle \
  --max_iters=4000 --lr=3e-4 --min_lr=3e-5 --warmup_iters=50 --ckpt_interval=0 --log_interval=100 --eval_samples=0 \
  --out_dir=/tmp/p7 2>&1 | grep -v Warn
cp /tmp/p7/log.jsonl /tmp/r/attempt7_p7_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p7/ckpt.pt'), '$OUT/hf7')"
for v in single multikey; do
  python3 needle.py --ckpt=$OUT/hf7 --lengths=16k,32k --depths=0,50,100 --samples=10 --variant=$v --out=/tmp/r/attempt7_p7_eval_$v.json 2>&1 | tail -1
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/attempt7_call1.tar.gz -C /tmp/r . && ls -la $OUT
