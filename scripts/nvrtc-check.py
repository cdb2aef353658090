#!/usr/bin/env python3
"""Compiles every CUDA kernel source of src/kernels with NVRTC, as Parallax does at run time
(common.cuh prepended, -std=c++17), for sm_80 and sm_90 (the *_sm90.cu sources for sm_90a only,
the fp8_* ones for sm_89 and sm_90, where they run),
without a GPU: NVRTC is a library, found in the toolkit scripts/device-pack.sh uses.
Prints each source's result and the kernels it defines; exits non-zero if any fails.
    python3 scripts/nvrtc-check.py
"""
import ctypes
import glob
import os
import re
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
toolkit = os.environ.get("CUDA_TOOLKIT_PREFIX", os.path.expanduser("~/.cache/cuda-13.0"))
found = glob.glob(os.path.join(toolkit, "venv/lib/python3*/site-packages/nvidia/cu*/lib/libnvrtc.so.*[0-9]"))
if not found:
    sys.exit(f"no libnvrtc under {toolkit} (set CUDA_TOOLKIT_PREFIX)")
libdir = os.path.dirname(found[0])
# NVRTC loads its builtins library from the loader's path.
ctypes.CDLL(glob.glob(os.path.join(libdir, "libnvrtc-builtins.so.*[0-9]"))[0], mode=ctypes.RTLD_GLOBAL)
nvrtc = ctypes.CDLL(found[0])


def compile_source(name, text, arch):
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None):
        return False, "nvrtcCreateProgram failed"
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip()


kernels = os.path.join(root, "src/kernels")
common = open(os.path.join(kernels, "common.cuh")).read()
# Sources compiled after another one, as their `SOURCE` constant joins them (ln_fp8.rs).
before = {"ln_fp8.cu": ["fp8_quant.cu"]}
failed = 0
for path in sorted(glob.glob(os.path.join(kernels, "*.cu"))):
    name = os.path.basename(path)
    text = common + "".join(open(os.path.join(kernels, b)).read() for b in before.get(name, []))
    text += open(path).read()
    if name.endswith("_sm90.cu"):
        archs = ["sm_90a"]
    elif name.startswith("fp8") or name == "ln_fp8.cu":  # only where FP8 products exist (sm_89+)
        archs = ["sm_89", "sm_90"]
    else:
        archs = ["sm_80", "sm_90"]
    entries = re.findall(r'extern "C" __global__ void (\w+)', text)
    for arch in archs:
        ok, log = compile_source(name, text, arch)
        failed += not ok
        print(f"{name:<22} {arch:<7} {'ok' if ok else 'FAILED'}  ({len(entries)} kernels)")
        if log and not ok:
            print(log)
print(f"{failed} failed")
sys.exit(1 if failed else 0)
