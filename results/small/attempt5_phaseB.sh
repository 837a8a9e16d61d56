#!/bin/bash
# Attempt 5 phase B: answer quotes the needle; from phase A's weights; 1024 single+multikey, then PoSE to 64k.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import model as M, shutil; M.export_hf(M.load_hf('.gpu/hfA'), '/tmp/hfA')"   # adds tokenizer files
COMMON="--seq_len=1024 --batch_size=128 --variants=single,multikey --haystacks=noise --ckpt_interval=500 --log_interval=100 --eval_samples=0 --warmup_iters=50"
timeout -s TERM ${B1_S:-230} python3 train.py --init_from=/tmp/hfA --out_dir=/tmp/b1 $COMMON --max_iters=3500 --lr=1e-3 --min_lr=3e-4 2>&1 | grep -v Warn
cp /tmp/b1/log.jsonl $OUT/phaseB1_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/b1/ckpt.pt'), '/tmp/hfB1')"
python3 needle.py --ckpt=/tmp/hfB1 --lengths=1k --depths=0,50,100 --samples=10 --variant=single --out=$OUT/evalB1_single.json 2>&1 | tail -1
python3 needle.py --ckpt=/tmp/hfB1 --lengths=1k --depths=0,50,100 --samples=10 --variant=multikey --out=$OUT/evalB1_multikey.json 2>&1 | tail -1
timeout -s TERM ${B2_S:-170} python3 train.py --init_from=/tmp/hfB1 --out_dir=/tmp/b2 $COMMON --max_pos=65536 --max_iters=3000 --lr=6e-4 --min_lr=2e-4 2>&1 | grep -v Warn
cp /tmp/b2/log.jsonl $OUT/phaseB2_log.jsonl
python3 -c "import model as M; M.export_hf(M.load_checkpoint('/tmp/b2/ckpt.pt'), '$OUT/hfB2')"
for v in single multikey; do
python3 needle.py --ckpt=$OUT/hfB2 --lengths=1k,4k,16k --depths=0,50,100 --samples=5 --variant=$v --out=$OUT/evalB2_$v.json 2>&1 | tail -1
done
mkdir -p $OUT/hfB1 && cp /tmp/hfB1/model.safetensors /tmp/hfB1/config.json $OUT/hfB1/
rm -f $OUT/hfB2/tokenizer*
