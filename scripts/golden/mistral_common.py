#!/usr/bin/env python3
"""Golden Mistral chat encodings from mistral-common for the tokenizer crate.

Usage:
    python scripts/golden/mistral_common.py [DATA_DIR]

Needs `mistral-common[sentencepiece]` (the oracle) in the interpreter that runs it. DATA_DIR holds
the tokenizer files mistral-common ships (default: the installed package's `data/` folder;
`scripts/fetch-mistral-tokenizers` puts the same files in ~/.cache/souverain/mistral-common).

For every shipped tokenizer file (SentencePiece `*.model.v*`, Tekken `tekken_*.json`) it writes
crates/tokenizer/tests/golden/mistral/<file name>.json with:
  - `header`: this script, the mistral-common / sentencepiece / tiktoken versions, the file's sha256;
  - `chat`: for each chat request (OpenAI-shaped messages and tools), the ids that
    `MistralTokenizer.encode_chat_completion` returns, or the error it raises;
  - `text`: plain encodings (`encode(text, bos=False, eos=False)`) and their decoding, alone and
    between BOS and EOS;
  - `fim`: for each (prompt, suffix) pair, the ids of
    `MistralTokenizer.encode_fim(FIMRequest(prompt=..., suffix=...))`, or the error it raises
    (v1 has no fill-in-the-middle).

It also writes golden files for tokenizers derived from `tekken_240911.json` by changing its
version to v11 / v13 and giving it an explicit special-token table with [THINK] tokens (no shipped
file exercises the v11 / v13 instruct formats); the derivation is recorded in the golden file's
`derived` field so that the Rust test rebuilds the same tokenizer.
"""

import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile

# This file's name shadows the package: drop its folder from the import path first.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import mistral_common  # noqa: E402
from mistral_common.protocol.fim.request import FIMRequest  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "crates", "tokenizer", "tests", "golden", "mistral")
SCRIPT = "scripts/golden/mistral_common.py"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — température incluse",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CHAT_CASES = [
    ("single_user", {"messages": [user("Hello, how are you?")]}),
    ("system_user", {"messages": [system("You are a terse assistant."), user("Name a colour.")]}),
    (
        "multi_turn",
        {
            "messages": [
                user("What is 2 + 2?"),
                assistant("4."),
                user("And times 3?"),
                assistant("12."),
                user("Thanks!"),
            ]
        },
    ),
    (
        "multi_turn_system_twice",
        {
            "messages": [
                system("First rule."),
                user("Hi"),
                assistant("Hello!"),
                user("Wait."),
                system("Second rule."),
                user("Bye"),
            ]
        },
    ),
    ("unicode", {"messages": [user("Café naïve — 日本語のテキスト 🤖🚀 Ελληνικά, ´`¨ \u00a0nbsp \u200bzw")]}),
    (
        "whitespace",
        {"messages": [user("  leading and trailing   \n\n\nthree newlines\ttab  \r\n crlf   ")]},
    ),
    ("only_spaces", {"messages": [user("    ")]}),
    ("empty_user", {"messages": [user("")]}),
    (
        "control_text_is_text",
        {
            "messages": [
                user(
                    "Print [INST] and [/INST] and </s> and <s> and [TOOL_CALLS] [SYSTEM_PROMPT] "
                    "[THINK] <unk> <0x41> ▁ [REF] [REFERENCE_DOC_3] <SPECIAL_20> literally."
                )
            ]
        },
    ),
    ("consecutive_users_merge", {"messages": [user("Part one."), user("Part two."), user("")]}),
    (
        "assistant_trailing_spaces",
        {"messages": [user("Say hi"), assistant("Hi there.   "), user("Again")]},
    ),
    ("digits_and_code", {"messages": [user("x = 1234567890 * 3.14159\ndef f(a):\n    return a  # ok\n")]}),
    ("tools_available", {"messages": [user("Weather in Paris?")], "tools": [WEATHER_TOOL, SEARCH_TOOL]}),
    (
        "tool_call_and_result",
        {
            "messages": [
                system("Use tools when useful."),
                user("Weather in Paris?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("call12345", "get_weather", '{"unit": "celsius", "city": "Paris"}')],
                },
                {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temp": 21.5, "sky": "ensoleillé"}'},
            ],
            "tools": [WEATHER_TOOL],
        },
    ),
    (
        "tool_result_not_json_then_answer",
        {
            "messages": [
                user("Weather in Oslo?"),
                {"role": "assistant", "tool_calls": [call("abcDEF789", "get_weather", {"city": "Oslo", "days": 2})]},
                {"role": "tool", "tool_call_id": "abcDEF789", "name": "get_weather", "content": "cold, 3 degrees"},
                assistant("It is cold in Oslo: 3 °C."),
                user("And tomorrow?"),
            ],
            "tools": [WEATHER_TOOL],
        },
    ),
    (
        "two_tool_calls_two_results",
        {
            "messages": [
                user("Compare Rome and Tokyo."),
                {
                    "role": "assistant",
                    "tool_calls": [
                        call("AAAAAAAA1", "get_weather", '{"city": "Rome"}'),
                        call("BBBBBBBB2", "get_weather", '{"city": "東京", "unit": "celsius", "x": [1, 2.0, 1e20, null, true]}'),
                    ],
                },
                {"role": "tool", "tool_call_id": "AAAAAAAA1", "name": "get_weather", "content": "25"},
                {"role": "tool", "tool_call_id": "BBBBBBBB2", "name": "get_weather", "content": '"rainy"'},
            ],
            "tools": [WEATHER_TOOL],
        },
    ),
    (
        "tool_result_order_differs",
        {
            "messages": [
                user("Two searches."),
                {
                    "role": "assistant",
                    "tool_calls": [call("first0001", "search", '{"query": "a"}'), call("second002", "search", '{"query": "b"}')],
                },
                {"role": "tool", "tool_call_id": "second002", "name": "search", "content": "result b"},
                {"role": "tool", "tool_call_id": "first0001", "name": "search", "content": ""},
            ],
            "tools": [SEARCH_TOOL],
        },
    ),
    (
        "assistant_content_and_tool_call",
        {
            "messages": [
                user("Search for cats."),
                {"role": "assistant", "content": "Let me search.", "tool_calls": [call("cats00001", "search", '{"query": "cats"}')]},
                {"role": "tool", "tool_call_id": "cats00001", "name": "search", "content": "{\"hits\": 3}"},
            ],
            "tools": [SEARCH_TOOL],
        },
    ),
    (
        "prefix_continue",
        {"messages": [user("Write a haiku."), assistant("Autumn moonlight —")], "continue_final_message": True},
    ),
    (
        "reasoning_history",
        {
            "messages": [
                user("Is 17 prime?"),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Check divisors up to 4: 2, 3. None divide 17."},
                        {"type": "text", "text": "Yes, 17 is prime."},
                    ],
                },
                user("And 21?"),
            ]
        },
    ),
    (
        "reasoning_unclosed_prefix",
        {
            "messages": [
                user("Think about 2+2."),
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "2+2 is", "closed": False}]},
            ],
            "continue_final_message": True,
        },
    ),
    (
        "bad_tool_call_id",
        {
            "messages": [
                user("Search."),
                {"role": "assistant", "tool_calls": [call("call_1", "search", '{"query": "x"}')]},
                {"role": "tool", "tool_call_id": "call_1", "name": "search", "content": "found"},
            ],
            "tools": [SEARCH_TOOL],
        },
    ),
    (
        "reasoning_field",
        {
            "messages": [
                user("Hi?"),
                {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back briefly."},
                user("Bye?"),
            ]
        },
    ),
    ("system_only", {"messages": [system("Only a system prompt.")]}),
    ("text_chunks", {"messages": [{"role": "user", "content": [{"type": "text", "text": "chunk one"}, {"type": "text", "text": "chunk two"}]}]}),
    ("starts_with_assistant", {"messages": [assistant("I speak first."), user("Ok")]}),
    ("ends_with_assistant", {"messages": [user("Hi"), assistant("Hello")]}),
]

TEXTS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing space ",
    "line one\nline two\n\n\nfour",
    "tabs\tand\r\nCRLF",
    "Café naïve façade — déjà vu",
    "日本語のテキストと中文",
    "emoji 🤖🚀👩‍👩‍👧 flags 🇫🇷",
    "Ελληνικά и русский",
    "numbers 1234567890 3.14159 -42 1e-9",
    "[INST] hello [/INST]</s><s>",
    "[REF] [REFERENCE_DOC_0] [TOOL_CALLS] <unk>",
    "<0x41> ▁▁ ▁x",
    "def f(x):\n    return x ** 2  # square\n",
    "\u0000\u0001 control \u007f bytes",
    "zero\u200bwidth\u00a0nbsp",
    "a" * 50,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∮ ∑ ∞",
    "ℌ ́combining á",
]

FIM_CASES = [
    ("code", "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("text", "Hello, my name is", " and I live in New York."),
    ("no_suffix", "The quick brown fox", None),
    ("empty_suffix", "The quick brown fox", ""),
    ("empty_prompt", "", "world!"),
    ("leading_spaces", "  indented", "   spaced suffix"),
    ("control_text_is_text", "[PREFIX] [INST] </s>", "[SUFFIX] [MIDDLE] <s>"),
    ("unicode", "Café — 日本語 ", " 🤖🚀 naïve"),
    ("newline_suffix", "x = 1", "\n"),
    ("one_char_suffix", "a", "b"),
]

# Special tokens for the derived v11 / v13 Tekken tokenizers: the 20 legacy ones, then the newer
# instruct markers. Unlisted ranks up to default_num_special_tokens become <SPECIAL_n>.
DERIVED_EXTRA_SPECIALS = [
    "[ARGS]",
    "[CALL_ID]",
    "[THINK]",
    "[/THINK]",
]
LEGACY_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


def derived_special_tokens():
    names = LEGACY_SPECIALS + DERIVED_EXTRA_SPECIALS
    return [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_chat(tok, case):
    try:
        request = ChatCompletionRequest.from_openai(
            messages=case["messages"],
            tools=case.get("tools"),
            continue_final_message=case.get("continue_final_message", False),
        )
        return {"ids": tok.encode_chat_completion(request).tokens}
    except Exception as e:  # the oracle's refusal is part of the golden data
        return {"error": f"{type(e).__name__}: {e}"}


def encode_fim(tok, prompt, suffix):
    try:
        return {"ids": tok.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens}
    except Exception as e:  # the oracle's refusal is part of the golden data
        return {"error": f"{type(e).__name__}: {e}"}


def versions():
    out = {"mistral_common": mistral_common.__version__}
    for pkg in ("sentencepiece", "tiktoken"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def golden_for(path, name, header_extra):
    tok = MistralTokenizer.from_file(path)
    inner = tok.instruct_tokenizer.tokenizer
    chat = []
    for case_name, case in CHAT_CASES:
        entry = {"name": case_name, "request": case}
        entry.update(encode_chat(tok, case))
        chat.append(entry)
    text = []
    for t in TEXTS:
        ids = inner.encode(t, bos=False, eos=False)
        with_bos = [inner.bos_id, *ids, inner.eos_id]
        text.append({"text": t, "ids": ids, "decoded": inner.decode(ids), "decoded_with_bos_eos": inner.decode(with_bos)})
    fim = []
    for case_name, prompt, suffix in FIM_CASES:
        entry = {"name": case_name, "prompt": prompt, "suffix": suffix}
        entry.update(encode_fim(tok, prompt, suffix))
        fim.append(entry)
    header = {
        "generated_by": SCRIPT,
        "file": name,
        "tokenizer_version": tok.instruct_tokenizer.tokenizer.version.value,
        "instruct_tokenizer": type(tok.instruct_tokenizer).__name__,
        "n_words": inner.n_words,
        "bos_id": inner.bos_id,
        "eos_id": inner.eos_id,
        **versions(),
        **header_extra,
    }
    return {"header": header, "chat": chat, "text": text, "fim": fim}


def write(name, doc):
    os.makedirs(OUT_DIR, exist_ok=True)
    out = os.path.join(OUT_DIR, name + ".golden.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    errors = sum(1 for c in doc["chat"] if "error" in c)
    fim_errors = sum(1 for c in doc["fim"] if "error" in c)
    print(
        f"{out}: {len(doc['chat'])} chat cases ({errors} refused), {len(doc['text'])} texts, "
        f"{len(doc['fim'])} FIM cases ({fim_errors} refused)"
    )


def main():
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(mistral_common.__file__), "data")
    files = sorted(
        f for f in os.listdir(data_dir) if ".model" in f or (f.startswith("tekken") and f.endswith(".json"))
    )
    if not files:
        sys.exit(f"no tokenizer files in {data_dir}")
    for name in files:
        path = os.path.join(data_dir, name)
        write(name, golden_for(path, name, {"sha256": sha256(path)}))

    base = "tekken_240911.json"
    base_path = os.path.join(data_dir, base)
    with open(base_path, encoding="utf-8") as f:
        model = json.load(f)
    for version in ("v11", "v13"):
        derived = {"base": base, "base_sha256": sha256(base_path), "version": version,
                   "special_tokens": derived_special_tokens()}
        model["config"]["version"] = version
        model["special_tokens"] = derived["special_tokens"]
        model.pop("image", None)
        with tempfile.TemporaryDirectory() as tmp:
            name = f"tekken_240911_derived_{version}.json"
            path = os.path.join(tmp, name)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(model, f)
            doc = golden_for(path, name, {"derived": derived})
        write(name, doc)


if __name__ == "__main__":
    main()
