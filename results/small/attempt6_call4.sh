#!/bin/bash
# Issue 11 attempt 6, call 4: from call 3's weights (.gpu/hf5): 4096-token windows, PoSE to 1M, all variants
# and haystacks; then the evaluation grid and the export that ships.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
timeout -s TERM ${P6_S:-200} python3 train.py --init_from=.gpu/hf5 --seq_len=4096 --batch_size=32 --max_pos=1048576 \
  --variants=single,multikey,multivalue,multiquery --haystacks=noise,essay,needle \
  --max_iters=3000 --lr=4e-4 --min_lr=5e-5 --warmup_iters=50 --ckpt_interval=0 --log_interval=100 --eval_samples=0 \
  --out_dir=/tmp/p6 2>&1 | grep -v Warn
cp /tmp/p6/log.jsonl /tmp/r/attempt6_p6_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p6/ckpt.pt'), '$OUT/hf6')"
for v in single multikey; do
  timeout 100 python3 needle.py --ckpt=$OUT/hf6 --lengths=4k,16k,32k,128k --depths=0,25,50,75,100 --samples=10 --variant=$v --out=/tmp/r/needle_small_$v.json 2>&1 | tail -1
done
timeout 210 python3 needle.py --ckpt=$OUT/hf6 --lengths=1M --depths=0,50,100 --samples=5 --variant=single --out=/tmp/r/needle_small_single_1m.json 2>&1 | tee /tmp/r/needle_small_single_1m.txt | tail -4
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json
tar -czf $OUT/attempt6_call4.tar.gz -C /tmp/r . && ls -la $OUT
