#!/usr/bin/env bash
# Adds link-time stand-ins for libcudnn.so (soname libcudnn.so.9) and libnccl.so (soname
# libnccl.so.2) to the CUDA toolkit that ../shared/cuda/setup-toolkit.sh assembled, when it has
# no real ones: the `cuda` feature links NCCL and the `cudnn` feature links cuDNN (candle builds
# cudarc with dynamic linking), and this build machine has neither. Each stand-in defines every
# cudnn*/nccl* function cudarc declares as an empty function, so only the link step uses it; on
# the GPU machine the real libraries (PyTorch's wheels, found by gpu-env.sh) are loaded by soname.
#   bash scripts/cuda-link-stubs.sh [TOOLKIT_PREFIX]     (default ~/.cache/cuda-13.0)
set -euo pipefail
prefix=${1:-$HOME/.cache/cuda-13.0}
source "$prefix/env.sh"
lib=$CUDA_HOME/lib
sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src 2>/dev/null | tail -1 || true)
if [[ -z $sys ]]; then
  echo "cudarc sources not found: run 'cargo fetch' in the project first" >&2; exit 1
fi
stub() { # name, soname, symbol prefix, sys folder
  local name=$1 soname=$2 pre=$3 dir=$4
  [[ -e $lib/lib$name.so ]] && return 0
  grep -ohE "pub (unsafe )?fn $pre[A-Za-z0-9_]+" "$sys/$dir"/*.rs | awk '{print $NF}' | sort -u \
    | sed 's/.*/void &(void){}/' > "$prefix/${name}_stub.c"
  gcc -shared -fPIC -Wl,-soname,"$soname" -o "$lib/lib$name.so" "$prefix/${name}_stub.c"
  echo "link stub: $lib/lib$name.so ($soname)"
}
stub cudnn libcudnn.so.9 cudnn cudnn/sys
stub nccl libnccl.so.2 nccl nccl/sys
