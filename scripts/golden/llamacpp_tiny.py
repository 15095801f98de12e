#!/usr/bin/env python3
"""llama.cpp's logits for the tiny GGUF files of transformers_tiny.py: the third oracle of
crates/model/tests/it/hf_golden.rs, beside transformers and our own reader.

The files (`deepseek3/model.gguf`, `deepseek3-lite/model.gguf`: `deepseek2`; `mistral4/
model.gguf`: `mistral4`; `mistral4/large3.gguf`: Mistral Large 3's `deepseek2` conversion;
`ministral3` (`mistral3`), `qwen2`, `qwen3`, `qwen3moe`, `gemma3` and the `llama` files with
RoPE scaling) carry no tokenizer, which llama.cpp needs to load a model, so each is copied with a
byte-level one (GPT-2's `gpt2` model, the 256 byte tokens in their byte order, one merge that
no token sequence below uses: the prompts go in as token ids). Two more differences, both of
the llama.cpp build and not of the format:

- llama.cpp 0.3.36 reads `{arch}.attention.q_lora_rank` whenever the layer count is not one of
  DeepSeek-V2-Lite's (26 or 27), so the copy of `deepseek3-lite` (3 layers, queries without a
  low-rank projection, whose converted file has no such key) says 0;
- llama-cpp-python passes YaRN's beta_fast / beta_slow as context parameters (32 / 1 by
  default), which win over the file's `rope.scaling.yarn_beta_*` keys: they are passed here
  as the file states them.

For each prompt of the model's logits.json it writes the same rows (every position of prompt
0, the last of the others) to `<model>/llamacpp-<file stem>.json`.

How to run (from the repository root; llama-cpp-python 0.3.36 built for this CPU, and the
`gguf` package):

    .venv-oracle/bin/python scripts/golden/llamacpp_tiny.py crates/model/tests/golden/tiny
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import gguf
import llama_cpp
import numpy as np

FILES = [
    ("deepseek3", "model.gguf"),
    ("deepseek3-lite", "model.gguf"),
    ("mistral4", "model.gguf"),
    ("mistral4", "large3.gguf"),
    ("ministral3", "model.gguf"),
    ("qwen2", "model.gguf"),
    ("qwen3", "model.gguf"),
    ("qwen3moe", "model.gguf"),
    ("gemma3", "gemma3.gguf"),
    ("llama-rope-linear", "model.gguf"),
    ("llama-rope-llama3", "model.gguf"),
    ("llama-rope-yarn", "model.gguf"),
]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def with_tokenizer(src: str, dst: str) -> dict:
    """Copies `src` adding the tokenizer (and `q_lora_rank` 0 where missing); returns the
    file's scalar keys."""
    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(dst, arch)
    keys = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            raise SystemExit(f"{src}: unexpected array key {name}")
        if t == gguf.GGUFValueType.STRING:
            value = bytes(f.parts[-1]).decode()
            w.add_string(name, value)
        else:
            value = f.parts[-1][0].item()
            w.add_key_value(name, value, t)
        keys[name] = value
    if arch == "deepseek2" and f"{arch}.attention.q_lora_rank" not in keys:
        w.add_uint32(f"{arch}.attention.q_lora_rank", 0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_alphabet())
    w.add_token_types([gguf.TokenType.NORMAL] * 256)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    keys["general.architecture"] = arch
    return keys


def main() -> None:
    root = sys.argv[1]
    for model, file in FILES:
        golden = json.load(open(os.path.join(root, model, "logits.json")))
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "model.gguf")
            keys = with_tokenizer(os.path.join(root, model, file), copy)
            arch = keys["general.architecture"]
            betas = {
                "yarn_beta_fast": keys.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
                "yarn_beta_slow": keys.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0),
            }
            llm = llama_cpp.Llama(copy, n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                                  seed=0, **betas)
            logits = []
            for i, prompt in enumerate(golden["prompts"]):
                llm.reset()
                llm.eval(prompt)
                rows = np.array(llm.scores[: len(prompt)], dtype=np.float64)
                rows = rows if i == 0 else rows[-1:]
                logits.append([[float(f"{v:.6g}") for v in row] for row in rows])
            del llm
        # What a gemma3 GGUF means to llama.cpp (queries scaled by 1/sqrt(head_dim)).
        oracle = golden.get("logits_gguf_reading", golden["logits"])
        worst = max(
            abs(a - b)
            for p, q in zip(logits, oracle)
            for r, s in zip(p, q)
            for a, b in zip(r, s)
        )
        print(f"{model}/{file}: llama.cpp vs transformers max |diff| {worst:.3g}")
        body = {
            "generator": "scripts/golden/llamacpp_tiny.py",
            "llama_cpp_python": llama_cpp.__version__,
            "file": file,
            "architecture": arch,
            "context_params": betas,
            "prompts": golden["prompts"],
            "logits_positions": "prompt 0: every position; the others: the last position",
            "logits": logits,
            "max_abs_diff_vs_transformers": worst,
        }
        stem = os.path.splitext(file)[0]
        with open(os.path.join(root, model, f"llamacpp-{stem}.json"), "w") as f:
            json.dump(body, f, separators=(",", ":"))
            f.write("\n")


if __name__ == "__main__":
    main()
