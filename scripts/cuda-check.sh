#!/usr/bin/env bash
# Type-checks the `cuda` feature (and its tests, benches and examples) on a machine without the
# CUDA toolkit, as CI does: `cargo check` runs candle-kernels' build script, which calls nvcc for
# every kernel; here a stand-in nvcc answers the version queries and writes empty outputs, so the
# check takes minutes instead of the tens of minutes a real kernel build takes on two cores.
# Nothing is linked or run — the GPU code is built for real by scripts/device-pack.sh.
#   bash scripts/cuda-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/cuda-check"
# A fixed place for the stand-in: candle's build script reruns whenever NVCC's path changes.
fake="$CARGO_TARGET_DIR/nvcc-stand-in"
mkdir -p "$fake/bin"
fake="$(cd "$fake" && pwd)"
cat > "$fake/bin/nvcc" <<'NVCC'
#!/usr/bin/env bash
# Stand-in nvcc for type-checking only: version queries answered, outputs written empty.
out="" dir="" ptx=0 src=()
while (($#)); do
    case "$1" in
        --version)
            printf '%s\n' "nvcc: stand-in for type-checking" "(no compiler)" "" \
                "Cuda compilation tools, release 13.0, V13.0.0"
            exit 0 ;;
        --list-gpu-code) echo "sm_80"; echo "sm_90"; exit 0 ;;
        -o) out="$2"; shift ;;
        --output-directory) dir="$2"; shift ;;
        --ptx) ptx=1 ;;
        *.cu) src+=("$1") ;;
    esac
    shift
done
if [[ -n $out ]]; then : > "$out"; fi
if ((ptx)) && [[ -n $dir ]]; then
    for s in "${src[@]}"; do b="$(basename "$s")"; : > "$dir/${b%.cu}.ptx"; done
fi
NVCC
chmod +x "$fake/bin/nvcc"
# cudarc's build script asks `nvcc --version` on PATH for the CUDA version.
export NVCC="$fake/bin/nvcc" CUDA_COMPUTE_CAP=90 PATH="$fake/bin:$PATH"
# `bash scripts/cuda-check.sh clippy` lints the same code instead.
cargo "${1:-check}" --no-default-features --features cuda --all-targets
