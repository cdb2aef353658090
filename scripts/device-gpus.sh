#!/usr/bin/env bash
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p $out
source .device/gpu-env.sh; chmod +x .device/parallax; B=.device/parallax
nvidia-smi -L
for args in "--device cuda" "--devices cuda:0" "--devices cuda"; do
  n=$(echo "$args" | tr -cd 'a-z0-9')
  /usr/bin/time -f "%e s wall" timeout 200 $B generate --model random:schnell $args --width 1024 --height 1024 --steps 4 --seed 3 --prompt "a lighthouse" --quiet --out $out/$n.png > $out/$n.log 2>&1
  echo "$args: rc=$? $(grep -h 'workers\|in [0-9.]*s\|s wall\|error' $out/$n.log | tr '\n' ' ')"
done
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
for n in ['devicescuda0','devicescuda']:
    try:
        b,_,_=px(o+f'/{n}.png'); d=sum(1 for x,y in zip(a,b) if x!=y); m=max(abs(x-y) for x,y in zip(a,b))
        print(n, 'vs --device cuda: bytes differing', d, 'of', len(a), 'max diff', m)
    except Exception as e: print(n, 'no image:', e)
PY
