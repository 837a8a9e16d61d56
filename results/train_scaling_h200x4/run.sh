#!/bin/bash
export PYTHONUNBUFFERED=1
A="--preset=1b --seq_len=4096 --batch_size=4 --max_iters=15 --warmup_iters=5 --log_interval=5 --compile=True --eval_samples=0 --ckpt_interval=0 --device=cuda --matmul_tflops=685.3"
python3 -c "import numpy as np; np.random.default_rng(0).integers(0,264,8<<20,dtype=np.uint16).tofile('/tmp/tok.bin')"
run() { # gpus name nproc parallel
  CUDA_VISIBLE_DEVICES=$1 torchrun --standalone --nproc_per_node=$3 train.py $A --data=/tmp/tok.bin --out_dir=/tmp/$2 --parallel=$4 > $OUT/$2.txt 2>&1 &
  P=$!
  for i in $(seq 200); do sleep 1; grep -q '"step": 15' /tmp/$2/log.jsonl 2>/dev/null && break; done
  cp /tmp/$2/log.jsonl $OUT/$2.jsonl; pkill -f "out_dir=/tmp/$2"; sleep 1
}
if [ -n "$FOUR" ]; then run 0,1,2,3 fsdp4 4 fsdp; run 0,1,2,3 ddp4 4 ddp; else
run 0,1 fsdp2 2 fsdp & run 2,3 ddp2 2 ddp & wait
run 0 fsdp1 1 fsdp; fi
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
tail -n 2 $OUT/*.jsonl | cut -c1-200
