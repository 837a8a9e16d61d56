#!/bin/bash
# Issue 11 attempt 6, call 1: (1) retrieval warm-up on attempt6_copydata.py's documents (all-token loss),
# (2) SFT on needle.py samples at 1024 (all variants and haystacks) from (1)'s weights; probes and evals.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
S=results/small; mkdir -p /tmp/r
YARN='{"type":"yarn","rope_type":"yarn","factor":32.0,"original_max_position_embeddings":32768,"beta_fast":32.0,"beta_slow":1.0,"mscale":1.0,"mscale_all_dim":1.0}'
python3 $S/attempt6_copydata.py /tmp/copy.bin ${N_TOK:-2.4e8}
timeout -s TERM ${P1_S:-210} python3 train.py --preset=small --model.rope_scaling="$YARN" --data=/tmp/copy.bin \
  --seq_len=512 --batch_size=${B1:-256} --max_iters=${P1_ITERS:-3000} --lr=2e-3 --min_lr=3e-4 --warmup_iters=100 \
  --ckpt_interval=0 --log_interval=100 --out_dir=/tmp/p1 2>&1 | grep -v Warn
cp /tmp/p1/log.jsonl /tmp/r/attempt6_p1_log.jsonl
python3 $S/attempt6_probe.py /tmp/p1/ckpt.pt 300 | tee /tmp/r/attempt6_p1_probe.txt
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p1/ckpt.pt'), '$OUT/hf1')"
timeout -s TERM ${P2_S:-200} python3 train.py --init_from=/tmp/p1/ckpt.pt --seq_len=1024 --batch_size=${B2:-128} \
  --variants=single,multikey,multivalue,multiquery --haystacks=noise,essay,needle --max_iters=${P2_ITERS:-2500} \
  --lr=1e-3 --min_lr=3e-4 --warmup_iters=50 --ckpt_interval=0 --log_interval=100 --eval_samples=0 --out_dir=/tmp/p2 2>&1 | grep -v Warn
cp /tmp/p2/log.jsonl /tmp/r/attempt6_p2_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/p2/ckpt.pt'), '$OUT/hf2')"
for v in single multikey; do
  python3 needle.py --ckpt=$OUT/hf2 --lengths=1k,4k --depths=0,50,100 --samples=10 --variant=$v --out=/tmp/r/attempt6_p2_eval_$v.json 2>&1 | tail -2
done
rm -f $OUT/hf*/tokenizer* $OUT/hf*/generation_config.json /tmp/r/*.png
tar -czf $OUT/attempt6_call1.tar.gz -C /tmp/r . && ls -la $OUT $OUT/*
