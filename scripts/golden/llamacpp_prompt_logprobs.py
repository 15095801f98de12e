#!/usr/bin/env python3
"""Golden prompt log-probabilities and fill-in-the-middle tokenisations from llama.cpp.

Writes crates/engine/tests/golden/llamacpp-prompt-logprobs.json for the engine's
`prompt_logprobs` and `fim` tests:

  - `cases`: for a few prompts, the prompt's token ids and, for every prompt token from the
    second on, its natural-log probability given the tokens before it and the 5 most likely
    tokens at that position (ids and log-probabilities). They are computed from llama.cpp's
    logits at every prompt position (`logits_all=True`) with a float64 log-softmax; where the
    completion API tokenises the prompt the same way, the script checks that
    `create_completion(echo=True, logprobs=5)` uses the same logits (it reads them one
    position late: see `prompt_case`).
  - `fim`: what llama.cpp's vocabulary loader finds as FIM_PRE / FIM_SUF / FIM_MID for the model
    (null when absent), whether it adds BOS, and for a few (prefix, suffix) pairs the ids of
    prefix and suffix tokenised as llama.cpp's server `/infill` tokenises them (no BOS, special
    tokens not parsed). The infill prompt is then [BOS if the model adds one] FIM_PRE prefix
    FIM_SUF suffix FIM_MID.

How to run (from the repository root; llama-cpp-python 0.3.36):

    .venv-oracle/bin/python scripts/golden/llamacpp_prompt_logprobs.py \\
        ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        crates/engine/tests/golden/llamacpp-prompt-logprobs.json
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

N_CTX = 512
N_THREADS = 2
SEED = 0
TOP = 5
DECIMALS = 5

PROMPTS = [
    ("capital_france", "The capital of France is Paris, and the capital of Italy is Rome."),
    ("fibonacci", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("chat_markup", "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4."),
    ("unicode", "Écris une phrase en français : « le café est très chaud » 😀"),
]

FIM_CASES = [
    ("code", "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("text", "The quick brown fox", " over the lazy dog."),
    ("empty_suffix", "Hello, my name is", ""),
    ("empty_prefix", "", " world!"),
    ("special_text_stays_text", "<|im_start|> <fim_prefix>x", "<fim_middle> é"),
]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def r(x: float) -> float:
    return round(float(x), DECIMALS)


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - (m + math.log(np.exp(row - m).sum()))


def prompt_case(llm: Llama, name: str, text: str) -> dict[str, Any]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens), :], dtype=np.float32, copy=True)
    positions = []
    for i in range(1, len(tokens)):
        lp = log_softmax(scores[i - 1])
        top = np.lexsort((np.arange(lp.shape[0]), -lp))[:TOP]
        positions.append(
            {
                "token": int(tokens[i]),
                "logprob": r(lp[tokens[i]]),
                "top": [[int(t), r(lp[t])] for t in top],
            }
        )
    # The logits are the ones the public completion API uses: llama-cpp-python 0.3.36's
    # `create_completion(echo=True, logprobs=k)` scores prompt token i with the logits computed
    # AT position i (which predict token i + 1), one position late; OpenAI and vLLM (and the
    # `positions` above) use the logits of position i - 1. Check the API against that reading.
    # The API tokenises text prompts without parsing special tokens: check only where that
    # gives the same tokens.
    api_checked = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == tokens
    if api_checked:
        llm.reset()
        out = llm.create_completion(text, max_tokens=1, echo=True, logprobs=TOP, temperature=0)
        api = out["choices"][0]["logprobs"]["token_logprobs"]
        if api[0] is not None or len(api) < len(tokens):
            sys.exit(f"{name}: unexpected echo logprobs {api[:3]}")
        worst = max(abs(api[i] - log_softmax(scores[i])[tokens[i]]) for i in range(1, len(tokens)))
        if worst > 1e-3:
            sys.exit(f"{name}: create_completion disagrees with the scores by {worst}")
    return {
        "name": name,
        "text": text,
        "tokens": [int(t) for t in tokens],
        "checked_against_create_completion": api_checked,
        "positions": positions,
    }


def fim_section(llm: Llama) -> dict[str, Any]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def tok(f) -> int | None:
        t = int(f(vocab))
        return None if t < 0 else t

    cases = []
    for name, prefix, suffix in FIM_CASES:
        cases.append(
            {
                "name": name,
                "prefix": prefix,
                "suffix": suffix,
                "prefix_ids": [int(t) for t in llm.tokenize(prefix.encode(), add_bos=False, special=False)],
                "suffix_ids": [int(t) for t in llm.tokenize(suffix.encode(), add_bos=False, special=False)],
            }
        )
    return {
        "fim_pre": tok(llama_cpp.llama_vocab_fim_pre),
        "fim_suf": tok(llama_cpp.llama_vocab_fim_suf),
        "fim_mid": tok(llama_cpp.llama_vocab_fim_mid),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "bos": tok(llama_cpp.llama_vocab_bos),
        "cases": cases,
    }


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf OUT.json")
    model_path, out_path = sys.argv[1], sys.argv[2]
    kwargs: dict[str, Any] = dict(
        model_path=model_path,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        logits_all=True,
        seed=SEED,
        verbose=False,
    )
    if "flash_attn" in inspect.signature(Llama.__init__).parameters:
        kwargs["flash_attn"] = False
    llm = Llama(**kwargs)
    doc = {
        "generator": "scripts/golden/llamacpp_prompt_logprobs.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": sha256_of(model_path),
        "settings": {
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "seed": SEED,
            "top": TOP,
            "tokenize": "add_bos=True (only if the model adds one), special=True",
            "logprobs": "float64 log-softmax of llama.cpp's logits at the previous position",
        },
        "cases": [prompt_case(llm, name, text) for name, text in PROMPTS],
        "fim": fim_section(llm),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
