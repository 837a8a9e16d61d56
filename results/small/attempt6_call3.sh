#!/bin/bash
# Issue 11 attempt 6, call 3: from call 2's PoSE weights (.gpu/hf4): 2048-token windows, PoSE to 1M, multikey
# and the distractor-needle haystack weighted x3/x2 (key lookup is what call 2 missed: 7% on multikey).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
timeout -s TERM ${P5_S:-480} python3 train.py --init_from=.gpu/hf4 --seq_len=2048 --batch_size=64 --max_pos=1048576 \
  --variants=single,multikey,multikey,multikey,multivalue,multiquery --haystacks=noise,essay,needle,needle \
  --max_iters=7000 --lr=8e-4 --min_lr=1e-4 --warmup_iters=50 --ckpt_interval=0 --log_interval=100 --eval_samples=0 \
  --out_dir=/tmp/p5 2>&1 | grep -v Warn
cp /tmp/p5/log.jsonl /tmp/r/attempt6_p5_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p5/ckpt.pt'), '$OUT/hf5')"
for v in single multikey; do
  python3 needle.py --ckpt=$OUT/hf5 --lengths=1k,4k,16k,32k --depths=0,50,100 --samples=10 --variant=$v --out=/tmp/r/attempt6_p5_eval_$v.json 2>&1 | tail -1
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/attempt6_call3.tar.gz -C /tmp/r . && ls -la $OUT
