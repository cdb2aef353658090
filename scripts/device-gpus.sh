#!/usr/bin/env bash
# Runs on the GPU machine (build from scripts/device-pack.sh in .device/): the same 1024 px
# schnell image through the plain loop (--device cuda), the in-process NCCL engine
# (--devices cuda:0, --devices cuda) and the GPU worker process (`parallax worker --device cuda`,
# NCCL ids handed over through its store), compared byte for byte with the first.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p $out
source .device/gpu-env.sh; chmod +x .device/parallax; B=.device/parallax
nvidia-smi -L
for args in "--device cuda" "--devices cuda:0" "--devices cuda"; do
  n=$(echo "$args" | tr -cd 'a-z0-9')
  /usr/bin/time -f "%e s wall" timeout 200 $B generate --model random:schnell $args --width 1024 --height 1024 --steps 4 --seed 3 --prompt "a lighthouse" --quiet --out $out/$n.png > $out/$n.log 2>&1
  echo "$args: rc=$? $(grep -h 'workers\|in [0-9.]*s\|s wall\|error' $out/$n.log | tr '\n' ' ')"
done
/usr/bin/time -f "%e s wall" timeout 200 $B worker --rank 0 --world 1 --init tcp://127.0.0.1:29517 --device cuda \
  --model random:schnell --width 1024 --height 1024 --steps 4 --seed 3 --prompt "a lighthouse" \
  --out $out/worker.png > $out/worker.log 2>&1
echo "worker --world 1 --device cuda: rc=$? $(grep -h 'rank 0\|NCCL\|processes\|s wall\|rror' $out/worker.log | tr '\n' ' ')"
python3 - $out <<'PY'
import sys, zlib, struct
def px(p):
    b=open(p,'rb').read(); i=8; data=b''; w=h=0
    while i < len(b):
        n=struct.unpack('>I',b[i:i+4])[0]; t=b[i+4:i+8]; c=b[i+8:i+8+n]; i+=12+n
        if t==b'IHDR': w,h=struct.unpack('>II',c[:8])
        if t==b'IDAT': data+=c
    return zlib.decompress(data), w, h
o=sys.argv[1]
a,_,_=px(o+'/devicecuda.png')
for n in ['devicescuda0','devicescuda','worker']:
    try:
        b,_,_=px(o+f'/{n}.png'); d=sum(1 for x,y in zip(a,b) if x!=y); m=max(abs(x-y) for x,y in zip(a,b))
        print(n, 'vs --device cuda: bytes differing', d, 'of', len(a), 'max diff', m)
    except Exception as e: print(n, 'no image:', e)
PY
