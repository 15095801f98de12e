#!/usr/bin/env python3
"""Times llama.cpp (through llama-cpp-python) the way `llama-bench` does, one repetition.

pp: one forward pass over N random tokens in one batch from an empty context (logits for the
last token only). tg: N single-token forward passes from an empty context, or with --depth D
from a context of D random tokens (filled once, untimed, in batches of 512; each repetition
removes the generated tokens again), as llama-bench's `-d`. Prints one JSON line:
{"pp_tps": ..., "tg_tps": ...}. Called by scripts/bench/vs-llamacpp and
scripts/bench/decode-at-depth.

    python llamacpp_bench.py MODEL.gguf --threads 2 -p 512 -n 128 [--depth 0] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import llama_cpp
from llama_cpp import Llama


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (0: skip)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens (0: skip)")
    ap.add_argument("--depth", "-d", type=int, default=0, help="context tokens before tg")
    ap.add_argument("--reps", "-r", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.depth > 0 and a.p > 0:
        ap.error("--depth measures tg only: use -p 0")

    n_ctx = max(a.p, a.depth + a.n) + 16
    batch_size = max(a.p, 1) if a.depth == 0 else max(a.p, 512)
    llm = Llama(
        model_path=a.model,
        n_ctx=n_ctx,
        n_batch=batch_size,
        n_ubatch=batch_size,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        logits_all=False,
        verbose=False,
    )
    rng = random.Random(a.seed)
    vocab = llm.n_vocab()
    ctx = llm.ctx

    def decode(tokens: list[int], pos0: int) -> None:
        n = len(tokens)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            llama_cpp.llama_batch_free(batch)

    def clear() -> None:
        mem = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_clear(mem, True)

    # Warm-up, as llama-bench does: one small batch and one token.
    clear()
    decode([rng.randrange(vocab) for _ in range(min(max(a.p, 1), 32))], 0)
    clear()
    decode([rng.randrange(vocab)], 0)
    llama_cpp.llama_synchronize(ctx)

    if a.depth > 0:
        clear()
        context = [rng.randrange(vocab) for _ in range(a.depth)]
        for at in range(0, a.depth, batch_size):
            decode(context[at : at + batch_size], at)
        llama_cpp.llama_synchronize(ctx)

    out: dict[str, list[float]] = {"pp_tps": [], "tg_tps": []}
    for _ in range(a.reps):
        if a.p > 0:
            toks = [rng.randrange(vocab) for _ in range(a.p)]
            clear()
            t0 = time.perf_counter()
            decode(toks, 0)
            llama_cpp.llama_synchronize(ctx)
            out["pp_tps"].append(a.p / (time.perf_counter() - t0))
        if a.n > 0:
            if a.depth > 0:
                mem = llama_cpp.llama_get_memory(ctx)
                llama_cpp.llama_memory_seq_rm(mem, 0, a.depth, -1)
            else:
                clear()
            tok = rng.randrange(vocab)
            t0 = time.perf_counter()
            for i in range(a.n):
                decode([tok], a.depth + i)
                llama_cpp.llama_synchronize(ctx)
            out["tg_tps"].append(a.n / (time.perf_counter() - t0))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
