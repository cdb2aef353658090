"""Write the GGUF fixtures: a small GGUF file made by the community's own writer (gguf-py, the
library llama.cpp and ComfyUI-GGUF's converter use) holding tensors in each GGML type it can
quantise, and the values gguf-py itself dequantises them to, so that tests/weights.rs checks
that Parallax reads such a file to the same numbers without Python.

With --check, read a GGUF file Parallax wrote (`parallax dev export-gguf`) with gguf-py and
print, per tensor type, the relative error of gguf-py's dequantised values against the
safetensors file it was made from: the K-quants (which gguf-py reads but cannot write) land at
their types' usual error only if Parallax laid their blocks out as llama.cpp does.

    python gguf-reference.py OUT_DIR
    python gguf-reference.py --check FILE.gguf SOURCE.safetensors
"""

import sys

import numpy as np
import gguf
from gguf import quants
from safetensors.numpy import save_file


def check(gguf_path, source):
    from safetensors.numpy import load_file
    src = load_file(source)
    reader = gguf.GGUFReader(gguf_path)
    errs = {}
    for t in reader.tensors:
        ref = src[t.name].astype(np.float32)
        got = quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        e = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
        errs.setdefault(t.tensor_type.name, []).append(e)
    for k, v in sorted(errs.items()):
        print(f"{k:6} {len(v):4} tensors  relative error mean {np.mean(v):.3e}  max {np.max(v):.3e}")


def main():
    if sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
        return
    out = sys.argv[1]
    rng = np.random.RandomState(7)
    w = gguf.GGUFWriter(f"{out}/gguf-community.gguf", "flux")
    expected = {}
    kinds = ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]
    for i, kind in enumerate(kinds):
        name = f"double_blocks.{i}.img_mlp.0.weight"
        x = rng.randn(8, 64).astype(np.float32) * (0.5 + i)
        t = getattr(gguf.GGMLQuantizationType, kind)
        if kind == "F32":
            w.add_tensor(name, x)
            expected[name] = x
            continue
        q = quants.quantize(x, t)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
        expected[name] = quants.dequantize(q, t).reshape(x.shape).astype(np.float32)
    # A tensor stored flat with its model shape in ComfyUI-GGUF's metadata key.
    x = rng.randn(4, 8, 32).astype(np.float32)
    flat = x.reshape(32, 32)
    q = quants.quantize(flat, gguf.GGMLQuantizationType.Q8_0)
    name = "final_layer.adaLN_modulation.1.weight"
    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_array(f"comfy.gguf.orig_shape.{name}", list(x.shape))
    expected[name] = quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in expected.items()},
              f"{out}/gguf-community-expected.safetensors")
    print("wrote", len(expected), "tensors")


if __name__ == "__main__":
    main()
