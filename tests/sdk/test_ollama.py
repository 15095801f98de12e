"""Ollama's API (`/api/*`) with the official `ollama` Python client.

Chat and generate (whole and streamed NDJSON, Ollama's counters), `format` with a JSON schema
(validated with `jsonschema`), a tool round trip, embeddings compared with `/v1/embeddings`,
list/show/ps/version, Ollama-shaped errors, and under `serve --auth` the same keys and metering
as the OpenAI routes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import jsonschema
import ollama
import pytest

if TYPE_CHECKING:
    from conftest import Server

GREEDY = {"temperature": 0, "seed": 7}
ASK = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city."}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def ol(server: Server) -> ollama.Client:
    return ollama.Client(host=server.root_url, timeout=120)


def check_counters(last: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    """Ollama's closing counters: present, positive, and consistent with each other."""
    assert last.done is True
    assert last.prompt_eval_count and last.prompt_eval_count > 0
    assert last.eval_count is not None and last.eval_count > 0
    for name in ("load_duration", "prompt_eval_duration", "eval_duration", "total_duration"):
        value = getattr(last, name)
        assert isinstance(value, int) and value >= 0, (name, value)
    assert last.total_duration > 0
    parts = last.load_duration + last.prompt_eval_duration + last.eval_duration
    assert parts <= last.total_duration, (parts, last.total_duration)


def test_chat_whole_and_streamed_agree(ol: ollama.Client, model_id: str) -> None:
    options = {**GREEDY, "num_predict": 12}
    whole = ol.chat(model=model_id, messages=ASK, options=options)
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.done_reason in ("stop", "length")
    assert whole.eval_count <= 12
    check_counters(whole)

    parts = list(ol.chat(model=model_id, messages=ASK, options=options, stream=True))
    assert len(parts) >= 2
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    check_counters(last)
    assert last.done_reason == whole.done_reason
    assert last.eval_count == whole.eval_count
    assert last.prompt_eval_count == whole.prompt_eval_count
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_streaming_is_the_default_and_ndjson(server: Server, model_id: str) -> None:
    body = {"model": model_id, "messages": ASK, "options": {**GREEDY, "num_predict": 4}}
    request = urllib.request.Request(
        f"{server.root_url}/api/chat",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in resp.read().decode().splitlines() if line]
    assert len(lines) >= 2
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 4


def test_num_predict_and_tag_names(ol: ollama.Client, model_id: str) -> None:
    r = ol.chat(
        model=f"{model_id}:latest", messages=ASK, options={**GREEDY, "num_predict": 3}
    )
    assert r.done_reason == "length"
    assert r.eval_count == 3


def test_generate_templated_raw_and_load(ol: ollama.Client, server: Server, model_id: str) -> None:
    r = ol.generate(
        model=model_id, prompt="Write one word.", system="Be brief.",
        options={**GREEDY, "num_predict": 6},
    )
    assert isinstance(r.response, str) and r.response
    check_counters(r)

    # `raw` is the prompt as given, which is what /v1/completions generates from.
    prompt = "The capital of France is"
    raw = ol.generate(model=model_id, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 5})
    assert raw.done_reason == "length" and raw.eval_count == 5
    openai_text = server.client.completions.create(
        model=model_id, prompt=prompt, max_tokens=5, temperature=0, seed=7
    ).choices[0].text
    assert raw.response == openai_text

    streamed = list(
        ol.generate(model=model_id, prompt=prompt, raw=True, stream=True,
                    options={**GREEDY, "num_predict": 5})
    )
    assert "".join(p.response for p in streamed) == raw.response

    load = ol.generate(model=model_id)
    assert load.done is True and load.done_reason == "load" and load.response == ""


def test_suffix_needs_fim_tokens(ol: ollama.Client, model_id: str) -> None:
    # SmolLM2 has no fill-in-the-middle tokens: a clear 400, as /v1/fim/completions gives.
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model=model_id, prompt="def add(a, b):\n", suffix="\n    return c\n")
    assert err.value.status_code == 400
    assert "fill-in-the-middle" in err.value.error


def test_format_json_schema_validates(ol: ollama.Client, model_id: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "colours": {"type": "array", "items": {"type": "string", "maxLength": 12},
                        "maxItems": 3},
        },
        "required": ["name", "age", "colours"],
    }
    r = ol.chat(
        model=model_id,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        format=schema,
        options={**GREEDY, "num_predict": 200},
    )
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), schema)

    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    g = ol.generate(model=model_id, prompt="Is the sky blue? Answer as JSON.", format=small,
                    options={**GREEDY, "num_predict": 50})
    assert g.done_reason == "stop"
    jsonschema.validate(json.loads(g.response), small)

    # `"json"`: any JSON object (this small model may ramble until the limit cuts it).
    j = ol.generate(model=model_id, prompt="A JSON object:", format="json",
                    options={**GREEDY, "num_predict": 20})
    assert j.response.startswith("{")


def test_tool_round_trip(ol: ollama.Client, model_id: str) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # Ollama cannot force a call; Souverain's `tool_choice` option can (the small test model
    # would rarely call on its own).
    options = {**GREEDY, "num_predict": 64, "tool_choice": "get_weather"}
    r = ol.chat(model=model_id, messages=messages, tools=[WEATHER], options=options)
    calls = r.message.tool_calls
    assert calls and len(calls) == 1, r.message
    call = calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, Mapping)
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])

    streamed = list(ol.chat(model=model_id, messages=messages, tools=[WEATHER],
                            options=options, stream=True))
    streamed_calls = [c for p in streamed for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed_calls] == [
        (call.function.name, dict(call.function.arguments))
    ]

    messages += [
        r.message,
        {"role": "tool", "content": "Sunny, 22 degrees.", "tool_name": "get_weather"},
    ]
    answer = ol.chat(model=model_id, messages=messages, tools=[WEATHER],
                     options={**GREEDY, "num_predict": 24, "tool_choice": "none"})
    assert answer.done is True
    assert answer.message.role == "assistant"
    assert not answer.message.tool_calls
    assert answer.message.content


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed_matches_v1_embeddings(ol: ollama.Client, server: Server) -> None:
    model = server.embedding_model_id
    if model is None:
        pytest.skip("no embedding model served (set SOUVERAIN_EMBEDDING_MODEL)")
    texts = ["The cat sits on the mat.", "Souverain serves models on your own hardware."]
    r = ol.embed(model=model, input=texts)
    reference = server.client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert r.model == model
    assert len(r.embeddings) == 2
    for mine, theirs in zip(r.embeddings, reference.data, strict=True):
        assert len(mine) == len(theirs.embedding)
        assert max(abs(a - b) for a, b in zip(mine, theirs.embedding, strict=True)) < 1e-6
    assert r.prompt_eval_count == reference.usage.prompt_tokens
    assert r.total_duration > 0

    one = ol.embed(model=model, input=texts[0])
    assert cosine(one.embeddings[0], reference.data[0].embedding) > 0.999999

    legacy = ol.embeddings(model=model, prompt=texts[1])
    assert cosine(legacy.embedding, reference.data[1].embedding) > 0.999999

    long_text = "word " * 1000
    with pytest.raises(ollama.ResponseError) as err:
        ol.embed(model=model, input=long_text, truncate=False)
    assert err.value.status_code == 400
    cut = ol.embed(model=model, input=long_text)
    assert len(cut.embeddings[0]) == len(r.embeddings[0])

    with pytest.raises(ollama.ResponseError) as err:
        ol.embed(model=server.model_id, input="x")
    assert err.value.status_code == 400


def test_list_show_ps_version(ol: ollama.Client, server: Server, model_id: str) -> None:
    model_file = Path(os.environ.get("SOUVERAIN_MODEL", "")).expanduser()
    listed = {m.model: m for m in ol.list().models}
    mine = listed[f"{model_id}:latest"]
    assert mine.details.format == "gguf"
    assert mine.details.family == "llama"
    assert mine.details.quantization_level == "Q4_1"
    assert mine.details.parameter_size.endswith("M")
    assert len(mine.digest) == 64
    if model_file.is_file():
        assert mine.size == model_file.stat().st_size
    if server.embedding_model_id:
        assert f"{server.embedding_model_id}:latest" in listed

    shown = ol.show(model_id)
    info = shown.modelinfo
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] > 0
    assert info["general.parameter_count"] > 100_000_000
    assert "completion" in shown.capabilities and "tools" in shown.capabilities
    assert "{%" in shown.template  # the GGUF's Jinja chat template
    assert shown.details.quantization_level == "Q4_1"

    running = {m.model: m for m in ol.ps().models}
    assert running[f"{model_id}:latest"].context_length > 0
    assert running[f"{model_id}:latest"].size >= mine.size

    with urllib.request.urlopen(f"{server.root_url}/api/version", timeout=10) as resp:
        assert json.load(resp)["version"]


def test_errors_are_ollama_errors(ol: ollama.Client, model_id: str) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ol.chat(model="no-such-model", messages=ASK)
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.error

    with pytest.raises(ollama.ResponseError) as err:
        ol.show("no-such-model")
    assert err.value.status_code == 404

    for options, named in [
        ({"temperature": "hot"}, "options.temperature"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"temperature": 7}, "temperature"),
        ({"mirostat": 2}, "mirostat"),
    ]:
        with pytest.raises(ollama.ResponseError) as err:
            ol.chat(model=model_id, messages=ASK, options=options)
        assert err.value.status_code == 400, options
        assert named in err.value.error, (options, err.value.error)

    with pytest.raises(ollama.ResponseError) as err:
        ol.chat(model=model_id, messages=[{"role": "user", "content": "What is this?",
                                           "images": [b"\x89PNG\r\n"]}])
    assert err.value.status_code == 400
    assert "images" in err.value.error

    with pytest.raises(ollama.ResponseError) as err:
        ol.chat(model=model_id, messages=ASK, think=True)
    assert err.value.status_code == 400
    assert "thinking" in err.value.error

    # Unknown options are ignored, as Ollama ignores them.
    r = ol.chat(model=model_id, messages=ASK, options={"num_predict": 2, "no_such_option": 1,
                                                       "num_gpu": 99})
    assert r.eval_count == 2


def test_thinking_comes_as_message_thinking(thinking_server: Server) -> None:
    ol = ollama.Client(host=thinking_server.root_url, timeout=120)
    model = thinking_server.model_id
    assert "thinking" in ol.show(model).capabilities
    r = ol.chat(model=model, messages=ASK, think=True, options={**GREEDY, "num_predict": 48})
    assert r.message.thinking, r.message
    assert "<think>" not in (r.message.content or "")
    parts = list(ol.chat(model=model, messages=ASK, think=True, stream=True,
                         options={**GREEDY, "num_predict": 48}))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    off = ol.chat(model=model, messages=ASK, think=False, options={**GREEDY, "num_predict": 16})
    assert not off.message.thinking


# ------------------------------------------------------------------------------------------
# Under `serve --auth`.
# ------------------------------------------------------------------------------------------


def _admin(root: str, admin_key: str, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{root}/admin/v1{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[tuple[str, str, str]]:
    """`serve --auth` with a fresh store: (root URL, admin key, a project key)."""
    binary = Path(os.environ.get("SOUVERAIN_BIN", "target/release/souverain"))
    model = Path(os.environ.get(
        "SOUVERAIN_MODEL", "~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )).expanduser()
    with tempfile.TemporaryDirectory(prefix="souverain-ollama-auth-") as tmp:
        admin_key = secrets.token_urlsafe(24)
        key_file = Path(tmp) / "admin.key"
        key_file.write_text(admin_key)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(binary), "serve", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(port), "--threads", "2", "--auth",
                 "--data-dir", str(Path(tmp) / "data"), "--admin-key-file", str(key_file)],
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{root}/health", timeout=1):
                        break
                except (urllib.error.URLError, OSError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"server did not start:\n{log.read_text()[-4000:]}")
                    time.sleep(0.2)
            org = _admin(root, admin_key, "POST", "/organizations", {"name": "Ollama users"})
            project = _admin(root, admin_key, "POST", f"/organizations/{org['id']}/projects",
                             {"name": "app"})
            key = _admin(root, admin_key, "POST", f"/projects/{project['id']}/keys",
                         {"name": "ollama"})
            yield root, admin_key, key["key"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_auth_refuses_without_a_good_key(auth_server: tuple[str, str, str]) -> None:
    root, _, _ = auth_server
    for headers in ({}, {"Authorization": "Bearer sk-sov-not-a-real-key"}):
        client = ollama.Client(host=root, headers=headers, timeout=60)
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model="anything", messages=ASK)
        assert err.value.status_code == 401, headers
        with pytest.raises(ollama.ResponseError) as err:
            client.list()
        assert err.value.status_code == 401


def test_auth_meters_a_good_key(auth_server: tuple[str, str, str]) -> None:
    root, admin_key, key = auth_server
    client = ollama.Client(host=root, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    model = client.list().models[0].model
    r = client.chat(model=model, messages=ASK, options={**GREEDY, "num_predict": 5})
    streamed = list(client.generate(model=model, prompt="Hello", stream=True,
                                    options={**GREEDY, "num_predict": 3}))
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=model, messages=ASK, options={"temperature": "hot"})
    assert err.value.status_code == 400

    records = _admin(root, admin_key, "GET", "/usage")["data"]
    ok = [rec for rec in records if rec["http_status"] == 200]
    assert sorted((rec["prompt_tokens"], rec["completion_tokens"]) for rec in ok) == sorted(
        [(r.prompt_eval_count, r.eval_count),
         (streamed[-1].prompt_eval_count, streamed[-1].eval_count)]
    )
    # The bad request consumed nothing.
    bad = [rec for rec in records if rec["http_status"] == 400]
    assert bad and all(rec["prompt_tokens"] == 0 and rec["completion_tokens"] == 0 for rec in bad)
