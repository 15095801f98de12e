#!/usr/bin/env python3
"""Write golden dequantisation values, using the `gguf` Python package (llama.cpp's own
gguf-py: GGUFReader and gguf.quants.dequantize) as the oracle.

Two outputs:

1. A JSON file for a real model quantised by llama.cpp (Gemma 3 270M Q4_K_M, see
   scripts/fetch-test-models): for the first tensor of each ggml type present, its name, type,
   shape, the first 512 dequantised values, 512 values at a fixed middle offset, two whole-tensor
   checksums of the f32 bit patterns (wrapping u64 sums: plain, and weighted by position), and
   the sum and sum of squares in f64. Checked by crates/model/tests/it/gemma_dequant.rs.

2. A text file of synthetic blocks for every block format the kernels support (Q4_0, Q4_1,
   Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): random quant bytes from a fixed seed with
   finite f16 scales, and gguf-py's dequantisation of them, as hex. Checked by
   crates/kernels/tests/it/formats.rs. Format, one record per type:

       type <NAME> blocks <N>
       bytes <hex of the raw blocks>
       values <hex of the f32 values as little-endian bytes, 8 digits per value>

How to run (from the repository root):

    python3 -m venv .venv-gguf && .venv-gguf/bin/pip install gguf==0.19.0 numpy
    scripts/fetch-test-models
    .venv-gguf/bin/python scripts/golden/gguf_dequant.py \\
        ~/.cache/souverain/models/gemma-3-270m-q4_k_m.gguf \\
        crates/model/tests/golden/gemma3-270m-q4_k_m-dequant.json \\
        crates/kernels/tests/golden/gguf_py_blocks.txt
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

SAMPLE = 512
SEED = 20240607

# Byte offsets of the f16 scale fields in each block, from ggml-common.h.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def checksums(values: np.ndarray) -> dict:
    bits = values.astype(np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    pos = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        plain = int(np.sum(bits, dtype=np.uint64))
        weighted = int(np.sum(bits * pos, dtype=np.uint64))
    v64 = values.astype(np.float64).reshape(-1)
    return {
        "bits_sum_u64": str(plain),
        "bits_weighted_sum_u64": str(weighted),
        "sum_f64": float(np.sum(v64)),
        "sum_squares_f64": float(np.sum(v64 * v64)),
    }


def model_golden(path: str) -> dict:
    reader = gguf.GGUFReader(path)
    seen: set[str] = set()
    tensors = []
    for t in reader.tensors:
        ty = t.tensor_type.name
        if ty in seen:
            continue
        seen.add(ty)
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        n = values.size
        mid = (n // 2) // 256 * 256
        mid = min(mid, max(0, n - SAMPLE))
        tensors.append(
            {
                "name": t.name,
                "type": ty,
                "dims": [int(d) for d in t.shape],
                "n_elements": int(n),
                "first": [float(v) for v in values[:SAMPLE]],
                "middle_offset": int(mid),
                "middle": [float(v) for v in values[mid : mid + SAMPLE]],
                **checksums(values),
            }
        )
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {
        "generator": "scripts/golden/gguf_dequant.py",
        "oracle": f"gguf-py {version('gguf')} (gguf.quants.dequantize), numpy {np.__version__}",
        "model": path.rsplit("/", 1)[-1],
        "model_sha256": sha.hexdigest(),
        "note": "values are f32 widened to f64 exactly; checksums are over f32 bit patterns",
        "tensors": tensors,
    }


def synthetic_blocks(out_path: str) -> None:
    rng = np.random.default_rng(SEED)
    lines = [
        "# Synthetic blocks dequantised by gguf-py: written by scripts/golden/gguf_dequant.py",
        f"# oracle: gguf-py {version('gguf')}, numpy {np.__version__}, seed {SEED}",
    ]
    for ty, fields in F16_FIELDS.items():
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[ty]
        n_blocks = 4 if block_elems == 32 else 2
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for at in fields:
            scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
            raw[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
        if ty == T.Q8_0:
            # ggml's quantiser never writes -128; keep the data in the format's real range.
            raw[:, 2:] = np.where(raw[:, 2:] == 128, 129, raw[:, 2:])
        flat = raw.reshape(-1)
        values = dequantize(flat, ty).astype(np.float32).reshape(-1)
        assert values.size == n_blocks * block_elems
        lines.append(f"type {ty.name} blocks {n_blocks}")
        lines.append("bytes " + flat.tobytes().hex())
        lines.append("values " + values.astype("<f4").tobytes().hex())
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    model_path, json_out, blocks_out = sys.argv[1:]
    golden = model_golden(model_path)
    with open(json_out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    synthetic_blocks(blocks_out)
    for t in golden["tensors"]:
        print(f"{t['type']:5} {t['name']}: {t['n_elements']} elements, sum {t['sum_f64']:.6g}")


if __name__ == "__main__":
    main()
