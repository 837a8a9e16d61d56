#!/bin/bash
# Phase A of the small needle SFT: single/noise at 512, long enough for retrieval to emerge (attempt 5).
set -x
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
YARN='{"type":"yarn","rope_type":"yarn","factor":32.0,"original_max_position_embeddings":32768,"beta_fast":32.0,"beta_slow":1.0,"mscale":1.0,"mscale_all_dim":1.0}'
timeout -s TERM ${TRAIN_S:-470} python3 train.py --preset=small --model.rope_scaling="$YARN" --out_dir=/tmp/a \
  --seq_len=512 --batch_size=256 --max_iters=${ITERS:-8000} --lr=1.5e-3 --min_lr=3e-4 --warmup_iters=100 \
  --variants=single --haystacks=noise --ckpt_interval=1000 --log_interval=100 --eval_samples=0 2>&1 | grep -v Warning
cp /tmp/a/log.jsonl $OUT/phaseA_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/a/ckpt.pt'), '$OUT/hfA')"
python3 needle.py --ckpt=$OUT/hfA --lengths=512,1k --samples=10 --variant=single --out=$OUT/evalA_single.json 2>&1 | tail -4
python3 needle.py --ckpt=$OUT/hfA --lengths=512 --samples=10 --variant=multikey --out=$OUT/evalA_multikey.json 2>&1 | tail -3
ls -la $OUT $OUT/hfA
