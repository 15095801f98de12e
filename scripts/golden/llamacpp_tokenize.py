#!/usr/bin/env python3
"""Golden tokenisation data from llama.cpp (through llama-cpp-python) for the tokenizer crate.

Usage:
    python scripts/golden/llamacpp_tokenize.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Needs `llama-cpp-python` (the oracle: tokenisation and detokenisation) in the interpreter that
runs it; GGUF metadata is read by the small reader below, so no other package is needed.

Writes, next to the crate's tests:
  crates/tokenizer/tests/golden/smollm2-spec.json      the TokenizerSpec read from the GGUF file
  crates/tokenizer/tests/golden/smollm2-tokenize.json  ids and decoded text for each test string
"""

import hashlib
import json
import os
import struct
import sys

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "crates", "tokenizer", "tests", "golden")
SCRIPT = "scripts/golden/llamacpp_tokenize.py"


def read_gguf_metadata(path):
    """Key/value metadata of a GGUF (v2/v3) file; stops before the tensor infos."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(size))[0]

        def read_str():
            n = read("<Q")
            return f.read(n).decode("utf-8", errors="surrogateescape")

        def read_value(t):
            if t in scalar:
                return read(scalar[t])
            if t == 8:
                return read_str()
            if t == 9:
                item_type = read("<I")
                n = read("<Q")
                return [read_value(item_type) for _ in range(n)]
            raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} not supported")
        read("<Q")  # tensor count
        n_kv = read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = read_str()
            meta[key] = read_value(read("<I"))
        return meta


STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    "\r\n",
    "Hello world",
    "Hello, world!",
    " Hello world",
    "Hello world ",
    "  leading and trailing  ",
    "multiple   spaces   between",
    "tabs\tand\t\tmore\ttabs",
    "line one\nline two\n\nline four",
    "windows\r\nline\r\nendings\r\n",
    "trailing newline\n",
    "1234567",
    "3.14159",
    "1,000,000 and 2.5e10",
    "year 2024, 42nd, 007",
    "I'm here, you'll see, DON'T stop, we've, they're, she'd, it's",
    "'s 't 're 've 'm 'll 'd",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * c; }",
    "<html><body class=\"x\">&amp;</body></html>",
    "!!!???...,,,;;;:::",
    "---===+++***///",
    "(){}[]<>|\\^~`@#$%&",
    "français, garçon, où, déjà vu",
    "España, niño, mañana",
    "Straße, Fußball, groß",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский текст: Привет, мир!",
    "中文测试：你好，世界。",
    "日本語のテキスト、カタカナ、ひらがな",
    "한국어 텍스트입니다",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "ไทย: สวัสดีชาวโลก",
    "emoji 😀🎉👍",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈",
    "flags 🇫🇷🇩🇪🇯🇵",
    "skin tones 👋🏽👋🏿",
    "combining: e\u0301 a\u0308 n\u0303 and Z\u0335\u0321a\u0336lgo",
    "NBSP:\u00a0x, ideographic\u3000space, line\u2028sep",
    "zero\u200bwidth\u200djoiner",
    "superscripts ² ³ ½ ¾ and Arabic-Indic ٣٤٥",
    "math ∑∫√∞ ≤ ≥ ≠ ±",
    "currency €100 £50 ¥1000 ₹20",
    "control \x01\x02\x7f chars",
    "private use \ue000 and unassigned \u0378",
    "bytes without a byte token: \U00040000 \U000e0001",
    "soft\u00adhyphen, next\u0085line, en\u2002space",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside",
    "<|im_start|><|im_end|><|im_start|>",
    "partial <|im_sta and im_end|>",
    "<repo_name>souverain<file_sep>main.rs",
    "URL: https://example.com/path?q=1&r=two#frag",
    "email: someone@example.org",
    "CamelCaseIdentifiers and snake_case_names",
    "ALL CAPS SENTENCE. lower case sentence.",
    "a b c d e f g",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "    indented code block",
    "\n\n\nparagraph after blank lines\n\n",
    " \n \n ",
    ("The quick brown fox jumps over the lazy dog. " * 20)
    + "Pack my box with five dozen liquor jugs! 1234567890 "
    + "Ünïcödé ✓ 日本 🎉 " * 10,
]


def detokenize(vocab, ids, remove_special, unparse_special):
    """llama.cpp's llama_detokenize, with the buffer grown as it asks."""
    n = len(ids)
    arr = (llama_cpp.llama_token * max(n, 1))(*ids)
    size = max(64, 8 * n)
    while True:
        buf = (ctypes_char * size)()
        got = llama_cpp.llama_detokenize(vocab, arr, n, buf, size, remove_special, unparse_special)
        if got < 0:
            size = -got
            continue
        return bytes(buf[:got])


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MODEL.gguf")
    model_path = sys.argv[1]
    with open(model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    meta = read_gguf_metadata(model_path)

    def opt(key):
        return meta.get(key)

    spec = {
        "model": meta["tokenizer.ggml.model"],
        "pre": opt("tokenizer.ggml.pre"),
        "tokens": meta["tokenizer.ggml.tokens"],
        "token_types": opt("tokenizer.ggml.token_type"),
        "merges": meta.get("tokenizer.ggml.merges", []),
        "bos_id": opt("tokenizer.ggml.bos_token_id"),
        "eos_id": opt("tokenizer.ggml.eos_token_id"),
        "eot_id": opt("tokenizer.ggml.eot_token_id"),
        "unk_id": opt("tokenizer.ggml.unknown_token_id"),
        "pad_id": opt("tokenizer.ggml.padding_token_id"),
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": opt("tokenizer.chat_template"),
    }
    header = {
        "generated_by": SCRIPT,
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "model_sha256": sha,
    }

    llm = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    cases = []
    for text in STRINGS:
        raw = text.encode("utf-8")
        case = {"text": text}
        for name, special in (("ids_parse_special", True), ("ids_plain", False)):
            ids = llm.tokenize(raw, add_bos=False, special=special)
            case[name] = ids
        ids = case["ids_parse_special"]
        case["decoded"] = detokenize(vocab, ids, False, True).decode("utf-8", errors="replace")
        case["decoded_skip_special"] = detokenize(vocab, ids, True, False).decode(
            "utf-8", errors="replace"
        )
        case["is_eog"] = [i for i in sorted(set(ids)) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        cases.append(case)

    eog_ids = [i for i in range(len(spec["tokens"])) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    os.makedirs(OUT_DIR, exist_ok=True)
    spec_path = os.path.join(OUT_DIR, "smollm2-spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump({"header": header, "spec": spec}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    tok_path = os.path.join(OUT_DIR, "smollm2-tokenize.json")
    with open(tok_path, "w", encoding="utf-8") as f:
        json.dump({"header": header, "eog_ids": eog_ids, "cases": cases}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {spec_path} ({os.path.getsize(spec_path)} bytes)")
    print(f"wrote {tok_path} ({len(cases)} cases)")


if __name__ == "__main__":
    import ctypes

    ctypes_char = ctypes.c_char
    main()
