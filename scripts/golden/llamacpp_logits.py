#!/usr/bin/env python3
"""Write golden logits for the Souverain forward-pass test, using llama.cpp as the oracle.

The output JSON records, for a handful of plain-text and chat prompts, the top-10 logits that
llama.cpp (through llama-cpp-python) computes at the last prompt position, and a 32-step
greedy decode (argmax of the raw logits; no sampler, no penalties) with the chosen token, its
logit and the runner-up at every step, so a test can tell a real disagreement from a near tie.
For the first prompt it also records the top-10 at every prompt position, which checks batched
prompt processing against llama.cpp's own batch.

How to run (from the repository root):

    python3 -m venv .venv-oracle
    .venv-oracle/bin/pip install llama-cpp-python==0.3.36 jinja2
    .venv-oracle/bin/python scripts/golden/llamacpp_logits.py \\
        ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        crates/model/tests/golden/smollm2-q4_1-llamacpp.json

llama-cpp-python builds llama.cpp from source for the local CPU; the numbers depend slightly
on the SIMD paths it picks, which is why the test compares with a tolerance and uses the
recorded margins. The settings used are written into the JSON header.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from typing import Any

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import Llama
import llama_cpp

N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
SEED = 0
TOP_K = 10
GREEDY_STEPS = 32
ADD_BOS = False
PARSE_SPECIAL = True
LOGIT_DECIMALS = 5

PLAIN_PROMPTS = [
    ("plain_capital_france", "The capital of France is"),
    ("plain_fibonacci", "def fibonacci(n):\n"),
    ("plain_once_upon", "Once upon a time, in a small village,"),
]

CHAT_PROMPTS = [
    ("chat_capital_france", "What is the capital of France?"),
    ("chat_haiku", "Write a haiku about the sea."),
    ("chat_unicode_fr", "Écris une phrase en français. 😀"),
]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def logit(x: Any) -> float:
    return round(float(x), LOGIT_DECIMALS)


def top_k(row: np.ndarray, k: int = TOP_K) -> list[list[Any]]:
    """The k largest logits of one row as [[id, logit], ...], highest first.

    Ties are broken by the lower token id, the same rule as np.argmax.
    """
    ids = np.lexsort((np.arange(row.shape[0]), -row.astype(np.float64)))[:k]
    return [[int(i), logit(row[i])] for i in ids]


def token_text(llm: Llama, token_id: int) -> str:
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")


# The template Souverain uses for a model whose GGUF carries none, by architecture (the
# engine's crates/engine/src/templates/), so that both sides render the same text.
FALLBACK_TEMPLATES = {"gemma3": "crates/engine/src/templates/gemma.jinja"}


def chat_template(llm: Llama) -> tuple[str, str]:
    """The model's chat template and where it came from."""
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        return template, "tokenizer.chat_template from GGUF metadata"
    arch = llm.metadata.get("general.architecture", "")
    path = FALLBACK_TEMPLATES.get(arch)
    if not path:
        sys.exit("model has no tokenizer.chat_template in its metadata")
    with open(path, encoding="utf-8") as f:
        return f.read(), f"{path} (the GGUF has no tokenizer.chat_template)"


def render_chat(llm: Llama, user_text: str) -> str:
    """Render one user turn with the model's own chat template (and its default system turn)."""
    template, _ = chat_template(llm)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    bos = token_text(llm, llm.token_bos()) if llm.token_bos() >= 0 else ""
    eos = token_text(llm, llm.token_eos()) if llm.token_eos() >= 0 else ""
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_text}],
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )


def run_case(llm: Llama, name: str, text: str) -> tuple[dict[str, Any], np.ndarray]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=ADD_BOS, special=PARSE_SPECIAL)
    if not tokens:
        sys.exit(f"case {name}: empty tokenisation")
    llm.reset()
    llm.eval(tokens)
    # With logits_all=True, llm.scores[i] holds the logits computed at position i.
    prompt_logits = np.array(llm.scores[: len(tokens), :], dtype=np.float32, copy=True)
    first_top10 = top_k(prompt_logits[-1])

    greedy = []
    row = prompt_logits[-1]
    generated: list[int] = []
    for _ in range(GREEDY_STEPS):
        best_two = top_k(row, 2)
        (chosen, chosen_logit), (second, second_logit) = best_two
        greedy.append(
            {
                "id": chosen,
                "logit": chosen_logit,
                "second_id": second,
                "second_logit": second_logit,
            }
        )
        generated.append(chosen)
        llm.eval([chosen])
        row = np.array(llm.scores[llm.n_tokens - 1, :], dtype=np.float32, copy=True)

    case = {
        "name": name,
        "text": text,
        "tokens": [int(t) for t in tokens],
        "first_top10": first_top10,
        "greedy": greedy,
        "greedy_text": llm.detokenize(generated, special=True).decode(
            "utf-8", errors="replace"
        ),
    }
    return case, prompt_logits


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf OUT.json")
    model_path, out_path = sys.argv[1], sys.argv[2]

    kwargs: dict[str, Any] = dict(
        model_path=model_path,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_batch=N_BATCH,
        logits_all=True,
        seed=SEED,
        verbose=False,
    )
    params = inspect.signature(Llama.__init__).parameters
    if "flash_attn" in params:
        kwargs["flash_attn"] = False
    llm = Llama(**kwargs)

    cases = []
    prompt_positions_top10: list[list[list[Any]]] = []
    for name, text in PLAIN_PROMPTS:
        case, prompt_logits = run_case(llm, name, text)
        if not prompt_positions_top10:
            prompt_positions_top10 = [top_k(r) for r in prompt_logits]
            prompt_positions_case = name
        cases.append(case)
    for name, user_text in CHAT_PROMPTS:
        case, _ = run_case(llm, name, render_chat(llm, user_text))
        case["user_message"] = user_text
        cases.append(case)

    # llama.cpp against itself: the same tokens evaluated one at a time (n_batch=1) instead of
    # in 512-token batches. The spread of the logits that the Rust test checks (first-position
    # top-10 and every greedy step's chosen token) is the floating-point noise inherent in this
    # quantised model; the Rust test's tolerance is derived from it.
    llm_single = Llama(**{**kwargs, "n_batch": 1, "n_ubatch": 1})
    diffs: list[float] = []
    for case in cases:
        seq = case["tokens"] + [step["id"] for step in case["greedy"]]
        llm_single.reset()
        llm_single.eval(seq)
        single = np.array(llm_single.scores[: len(seq), :], dtype=np.float32, copy=True)
        n = len(case["tokens"])
        for tok, value in case["first_top10"]:
            diffs.append(abs(float(single[n - 1][tok]) - value))
        for i, step in enumerate(case["greedy"]):
            diffs.append(abs(float(single[n - 1 + i][step["id"]]) - step["logit"]))
    self_consistency = {
        "compare": "golden logits (n_batch=512) vs the same tokens with n_batch=1",
        "values": len(diffs),
        "max_abs_diff": round(max(diffs), LOGIT_DECIMALS),
        "mean_abs_diff": round(sum(diffs) / len(diffs), LOGIT_DECIMALS),
    }

    settings = {
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "n_batch": N_BATCH,
        "logits_all": True,
        "flash_attn": kwargs.get("flash_attn", "parameter absent"),
        "seed": SEED,
        "tokenize_add_bos": ADD_BOS,
        "tokenize_special": PARSE_SPECIAL,
        "chat_template": chat_template(llm)[1] + ", rendered with jinja2 "
        "(trim_blocks, lstrip_blocks), one user message, add_generation_prompt=True",
        "greedy_steps": GREEDY_STEPS,
        "greedy_rule": "argmax of raw logits (ties to lower id); decoding continues past "
        "end-of-generation tokens",
        "top_k": TOP_K,
        "logit_decimals": LOGIT_DECIMALS,
        "prompt_positions_case": prompt_positions_case,
    }
    doc = {
        "generator": "scripts/golden/llamacpp_logits.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": sha256_of(model_path),
        "n_vocab": int(llm.n_vocab()),
        "bos_token_id": int(llm.token_bos()),
        "eos_token_id": int(llm.token_eos()),
        "settings": settings,
        "cases": cases,
        "prompt_positions_top10": prompt_positions_top10,
        "self_consistency": self_consistency,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
