#!/usr/bin/env python3
"""Write golden GBNF-constrained completions for Souverain's GBNF test, with llama.cpp as oracle.

For each (prompt, GBNF grammar) pair, llama.cpp (through llama-cpp-python) completes the prompt
greedily (temperature 0) under the grammar; the output records the prompt's token ids, the
completion's text and finish reason, and the same decode done step by step with, at each step,
the token, its length in bytes and its margin over the best other token the grammar allows. For each grammar it also records llama.cpp's
own verdict (accept or reject as a whole output) on a list of strings, read from llama.cpp's
grammar sampler: the string's tokens are offered one at a time and must each survive the
grammar's mask, then the end-of-generation token must be allowed.

How to run (from the repository root):

    python3 -m venv .venv-oracle
    .venv-oracle/bin/pip install llama-cpp-python==0.3.36
    .venv-oracle/bin/python scripts/golden/llamacpp_grammar.py \\
        ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        crates/engine/tests/golden/llamacpp-grammar.json
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys

import numpy as np

import llama_cpp
from llama_cpp import Llama, LlamaGrammar

N_CTX = 2048
N_THREADS = 2
SEED = 0
MAX_TOKENS = 24


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# Grammars written for this test in the style of llama.cpp's grammars/ directory.
JSON = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""

ARITHMETIC = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"""

LIST = r"""
root ::= item{2,4}
item ::= "- " [^\r\n]{1,40} "\n"
"""

CHESS = r"""
# Numbered moves in algebraic notation.
root   ::= "1. " move " " move "\n" ([2-9] ". " move " " move "\n"){1,3}
move   ::= (pawn | nonpawn | castle) [+#]?
pawn   ::= ([a-h] "x")? [a-h] [1-8] ("=" [NBRQ])?
nonpawn ::= [NBKQR] [a-h]? [1-8]? "x"? [a-h] [1-8]
castle ::= "O-O" "-O"?
"""

C_LIKE = r"""
root ::= declaration+
declaration ::= data-type " " ident "(" params? ") {\n" statement{1,3} "}\n"
data-type ::= "int" | "float" | "char" | "void"
ident ::= [a-zA-Z_] [a-zA-Z_0-9]{0,11}
params ::= data-type " " ident (", " data-type " " ident)*
statement ::= "    " (ident " = " expr ";" | "return " expr ";") "\n"
expr ::= term ((" + " | " - " | " * ") term)*
term ::= ident | [0-9]{1,4}
"""

YES_NO = r"""
root ::= ("Yes" | "No") ", because " reason "."
reason ::= [a-z] [a-z ,]{4,60}
"""

DATE = r"""
root ::= year "-" month "-" day ( " " | "T" ) hour ":" [0-5] [0-9]
year ::= [12] [0-9]{3}
month ::= "0" [1-9] | "1" [0-2]
day ::= "0" [1-9] | [12] [0-9] | "3" [01]
hour ::= [01] [0-9] | "2" [0-3]
"""

FRENCH = r"""
root ::= mot (" " mot){2,8} [.!] " " emoji
mot ::= [a-zA-ZàâçéèêëîïôûùüÿœÉÀ'\-]+
emoji ::= [\U0001F600-\U0001F64F] | "\u2764"
"""

CASES = [
    {
        "name": "json",
        "prompt": chat("Describe a cat as a JSON object with its name and age."),
        "grammar": JSON,
        "strings": [
            ['{"a": 1}', True],
            ["{}", True],
            ['{"a": [true, null, -1.5e3]}', True],
            ['{"a": "\\u00e9\\n"}', True],
            ["[1, 2]", False],
            ['{"a": 01}', False],
            ["{'a': 1}", False],
            ['{"a": 1', False],
        ],
    },
    {
        "name": "arithmetic",
        "prompt": chat("Write two equations."),
        "grammar": ARITHMETIC,
        "strings": [
            ["x=1\n", True],
            ["a +b=(c) \n2*y= z\n", True],
            ["1+2=3\n", True],
            ["x=1", False],
            ["=1\n", False],
            ["X=1\n", False],
        ],
    },
    {
        "name": "list",
        "prompt": chat("List three fruits."),
        "grammar": LIST,
        "strings": [
            ["- apple\n- pear\n", True],
            ["- a\n- b\n- c\n- d\n", True],
            ["- apple\n", False],
            ["- a\n- b\n- c\n- d\n- e\n", False],
            ["-apple\n- pear\n", False],
        ],
    },
    {
        "name": "chess",
        "prompt": chat("Write the first moves of a chess game."),
        "grammar": CHESS,
        "strings": [
            ["1. e4 e5\n2. Nf3 Nc6\n", True],
            ["1. e4 e5\n2. O-O-O Qxd8+\n3. exd8=Q# a1\n", True],
            ["1. e4 e5\n", False],
            ["1. e9 e5\n2. Nf3 Nc6\n", False],
        ],
    },
    {
        "name": "c_like",
        "prompt": chat("Write a C function that adds two integers."),
        "grammar": C_LIKE,
        "strings": [
            ["int add(int a, int b) {\n    return a + b;\n}\n", True],
            ["void f() {\n    x = 1;\n    return x;\n}\n", True],
            ["int add(int a, int b) {\n}\n", False],
            ["int 1add() {\n    return 1;\n}\n", False],
        ],
    },
    {
        "name": "yes_no",
        "prompt": chat("Is the sea salty? Answer and explain."),
        "grammar": YES_NO,
        "strings": [
            ["Yes, because it has salt.", True],
            ["No, because abcde.", True],
            ["Yes, because abc.", False],
            ["Maybe, because it is.", False],
        ],
    },
    {
        "name": "date",
        "prompt": chat("When did the first man land on the Moon? Give the date and time."),
        "grammar": DATE,
        "strings": [
            ["1969-07-20 20:17", True],
            ["2024-12-31T23:59", True],
            ["1969-13-20 20:17", False],
            ["1969-07-20 24:00", False],
            ["1969-07-32 20:17", False],
        ],
    },
    {
        "name": "french_unicode",
        "prompt": chat("Écris une phrase en français avec un emoji."),
        "grammar": FRENCH,
        "strings": [
            ["Le café est très bon! 😀", True],
            ["Où est l'hôtel. ❤", True],
            ["Le café! 😀", False],
            ["Le café est bon! :)", False],
        ],
    },
]


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verdict(llm: Llama, grammar: str, text: str) -> bool:
    """llama.cpp's verdict on `text` as a whole output of `grammar`."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise RuntimeError("llama.cpp refused the grammar")
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        eos = llama_cpp.llama_vocab_eos(vocab)
        for token in tokens + [eos]:
            data = (llama_cpp.llama_token_data * 1)()
            data[0].id = token
            data[0].logit = 0.0
            data[0].p = 0.0
            array = llama_cpp.llama_token_data_array(
                data=data, size=1, selected=-1, sorted=False
            )
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            if data[0].logit == float("-inf"):
                return False
            if token != eos:
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def greedy_steps(llm: Llama, grammar: str, prompt_tokens: list[int]) -> tuple[bytes, list]:
    """Greedy decoding under the grammar, step by step, with each step's margin: how far the
    chosen token's logit is above the best other token the grammar allows (a near tie is
    where another implementation, with slightly different logits, may choose otherwise)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    llm.reset()
    llm.eval(prompt_tokens)
    out = b""
    steps = []
    try:
        for _ in range(MAX_TOKENS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            data = (llama_cpp.llama_token_data * n_vocab)()
            for i in range(n_vocab):
                data[i].id = i
                data[i].logit = float(logits[i])
                data[i].p = 0.0
            array = llama_cpp.llama_token_data_array(
                data=data, size=n_vocab, selected=-1, sorted=False
            )
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            masked = np.array([data[i].logit for i in range(n_vocab)], dtype=np.float64)
            order = np.lexsort((np.arange(n_vocab), -masked))
            token = int(order[0])
            margin = float(masked[order[0]] - masked[order[1]])
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            llama_cpp.llama_sampler_accept(sampler, token)
            piece = llm.detokenize([token])
            out += piece
            steps.append(
                {
                    "token": token,
                    "bytes": len(piece),
                    "margin": round(margin, 4) if np.isfinite(margin) else None,
                }
            )
            llm.eval([token])
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return out, steps


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model_path, out_path = sys.argv[1], sys.argv[2]
    llm = Llama(
        model_path=model_path,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        seed=SEED,
        logits_all=True,
        verbose=False,
    )
    cases = []
    for case in CASES:
        prompt_tokens = llm.tokenize(case["prompt"].encode(), add_bos=False, special=True)
        llm.reset()
        result = llm.create_completion(
            case["prompt"],
            grammar=LlamaGrammar.from_string(case["grammar"], verbose=False),
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            repeat_penalty=1.0,
            max_tokens=MAX_TOKENS,
            seed=SEED,
        )
        choice = result["choices"][0]
        completion_tokens = llm.tokenize(
            choice["text"].encode(), add_bos=False, special=False
        )
        stepped, steps = greedy_steps(llm, case["grammar"], prompt_tokens)
        if stepped.decode("utf-8", errors="replace") != choice["text"]:
            raise RuntimeError(f"{case['name']}: the step-by-step decode differs")
        strings = []
        for text, expected in case["strings"]:
            accepted = verdict(llm, case["grammar"], text)
            if accepted != expected:
                print(f"note: llama.cpp says {accepted} on {text!r} ({case['name']})")
            strings.append({"text": text, "accepted": accepted})
        cases.append(
            {
                "name": case["name"],
                "prompt": case["prompt"],
                "prompt_tokens": prompt_tokens,
                "grammar": case["grammar"],
                "completion": choice["text"],
                "completion_tokens_retokenized": completion_tokens,
                "finish_reason": choice["finish_reason"],
                "steps": steps,
                "strings": strings,
            }
        )
        print(f"{case['name']}: {choice['text']!r} ({choice['finish_reason']})")
    out = {
        "generator": "scripts/golden/llamacpp_grammar.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model": os.path.basename(model_path),
        "model_sha256": sha256_of(model_path),
        "settings": {
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "seed": SEED,
            "temperature": 0.0,
            "max_tokens": MAX_TOKENS,
            "add_bos": False,
            "parse_special": True,
        },
        "cases": cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
