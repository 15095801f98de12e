#!/usr/bin/env python3
"""Golden logits for a prompt longer than a sliding window, from llama.cpp: one plain-text
prompt of about 1,200 tokens (Gemma 3's windowed layers see the last 512 positions only, its
global layers all of them), then a 32-step greedy decode, in the format of
scripts/golden/llamacpp_logits.py (whose `run_case` it uses: top-10 at the last prompt
position, each greedy step's token, logit and runner-up) with its own `self_consistency`
(the same tokens evaluated with n_batch=1).

How to run (from the repository root, with the venv of llamacpp_logits.py):

    .venv-oracle/bin/python scripts/golden/llamacpp_long.py \\
        ~/.cache/souverain/models/gemma-3-270m-q4_k_m.gguf \\
        crates/model/tests/golden/gemma3-270m-q4_k_m-llamacpp-long.json
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# This directory holds mistral_common.py, which must not shadow the package of that name.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != str(HERE)]


def load_base():
    """scripts/golden/llamacpp_logits.py as a module."""
    path = str(HERE / "llamacpp_logits.py")
    loader = importlib.machinery.SourceFileLoader("llamacpp_logits", path)
    spec = importlib.util.spec_from_loader("llamacpp_logits", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def long_text() -> str:
    """About 1,200 tokens of varied, deterministic prose."""
    towns = ["Lyon", "Gdansk", "Porto", "Tartu", "Bologna", "Ghent", "Brno", "Cork"]
    goods = ["wool", "salt", "amber", "wine", "paper", "glass", "copper", "silk"]
    lines = []
    for i in range(48):
        t, g = towns[i % 8], goods[(i * 3) % 8]
        lines.append(
            f"Entry {i + 1}: the merchant from {t} sold {10 + (i * 7) % 90} bales of {g} "
            f"and noted that the river was {'high' if i % 3 else 'low'} that week."
        )
    lines.append("Summary of the ledger: the merchant from")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf OUT.json")
    model_path, out_path = sys.argv[1], sys.argv[2]
    base = load_base()
    kwargs = dict(
        model_path=model_path,
        n_ctx=base.N_CTX,
        n_threads=base.N_THREADS,
        n_batch=base.N_BATCH,
        logits_all=True,
        seed=base.SEED,
        verbose=False,
        flash_attn=False,
    )
    llm = base.Llama(**kwargs)
    case, _ = base.run_case(llm, "plain_long_ledger", long_text())

    llm_single = base.Llama(**{**kwargs, "n_batch": 1, "n_ubatch": 1})
    seq = case["tokens"] + [step["id"] for step in case["greedy"]]
    llm_single.reset()
    llm_single.eval(seq)
    single = np.array(llm_single.scores[: len(seq), :], dtype=np.float32, copy=True)
    n = len(case["tokens"])
    diffs = [abs(float(single[n - 1][tok]) - value) for tok, value in case["first_top10"]]
    diffs += [
        abs(float(single[n - 1 + i][step["id"]]) - step["logit"])
        for i, step in enumerate(case["greedy"])
    ]
    doc = {
        "generator": "scripts/golden/llamacpp_long.py",
        "llama_cpp_python": base.llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": base.sha256_of(model_path),
        "n_vocab": int(llm.n_vocab()),
        "settings": {
            "n_ctx": base.N_CTX,
            "n_threads": base.N_THREADS,
            "n_batch": base.N_BATCH,
            "logits_all": True,
            "flash_attn": False,
            "tokenize_add_bos": base.ADD_BOS,
            "tokenize_special": base.PARSE_SPECIAL,
            "greedy_steps": base.GREEDY_STEPS,
            "greedy_rule": "argmax of raw logits (ties to lower id)",
        },
        "cases": [case],
        "self_consistency": {
            "compare": "golden logits (n_batch=512) vs the same tokens with n_batch=1",
            "values": len(diffs),
            "max_abs_diff": round(max(diffs), base.LOGIT_DECIMALS),
            "mean_abs_diff": round(sum(diffs) / len(diffs), base.LOGIT_DECIMALS),
        },
    }
    print(f"{len(case['tokens'])} prompt tokens; greedy: {case['greedy_text']!r}; "
          f"self-consistency max {doc['self_consistency']['max_abs_diff']}")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
