#!/bin/bash
# Issue 11 attempt 6, call 2: from call 1's SFT weights (.gpu/hf2): more SFT at 1024 (all variants and haystacks),
# then the same with PoSE positions up to 128k; evals at 1k-16k.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p /tmp/r
C="--seq_len=1024 --batch_size=128 --variants=single,multikey,multivalue,multiquery --haystacks=noise,essay,needle --ckpt_interval=0 --log_interval=100 --eval_samples=0 --warmup_iters=50"
timeout -s TERM ${P3_S:-200} python3 train.py --init_from=.gpu/hf2 $C --max_iters=2800 --lr=1e-3 --min_lr=2e-4 --out_dir=/tmp/p3 2>&1 | grep -v Warn
cp /tmp/p3/log.jsonl /tmp/r/attempt6_p3_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p3/ckpt.pt'), '$OUT/hf3')"
python3 needle.py --ckpt=$OUT/hf3 --lengths=1k,2k --depths=0,50,100 --samples=10 --variant=single --out=/tmp/r/attempt6_p3_eval_single.json 2>&1 | tail -1
timeout -s TERM ${P4_S:-190} python3 train.py --init_from=/tmp/p3/ckpt.pt $C --max_pos=131072 --max_iters=2800 --lr=6e-4 --min_lr=1e-4 --out_dir=/tmp/p4 2>&1 | grep -v Warn
cp /tmp/p4/log.jsonl /tmp/r/attempt6_p4_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p4/ckpt.pt'), '$OUT/hf4')"
for v in single multikey; do
  python3 needle.py --ckpt=$OUT/hf4 --lengths=1k,4k,16k --depths=0,50,100 --samples=10 --variant=$v --out=/tmp/r/attempt6_p4_eval_$v.json 2>&1 | tail -1
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/attempt6_call2.tar.gz -C /tmp/r . && ls -la $OUT
