"""The OpenAI-compatible contract of `souverain serve`, checked with the official `openai` SDK.

The fixtures in conftest.py start one server for the session; see there for how to run.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

if TYPE_CHECKING:
    from conftest import Server

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a cat who learns to fly."}]


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, str]], **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=messages, **kw)


def greedy(client: openai.OpenAI, model: str, messages: list[dict[str, str]], **kw: Any) -> Any:
    kw.setdefault("max_tokens", 16)
    return chat(client, model, messages, temperature=0, **kw)


# ---------------------------------------------------------------------------------------------
# models


def test_models_list_has_exactly_one_model(server: Server) -> None:
    # One chat model, and the embedding model after it when one is served beside it.
    models = server.client.models.list().data
    assert len(models) == (1 if server.embedding_model_id is None else 2)
    assert models[0].object == "model"
    assert isinstance(models[0].id, str) and models[0].id
    assert models[0].id == server.model_id


# ---------------------------------------------------------------------------------------------
# chat completions


def test_chat_non_stream_shape(client: openai.OpenAI, model_id: str) -> None:
    resp = greedy(client, model_id, HELLO, max_tokens=16)
    assert isinstance(resp, ChatCompletion)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content != ""
    assert choice.finish_reason in {"stop", "length"}
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 16


def test_greedy_is_deterministic(client: openai.OpenAI, model_id: str) -> None:
    a = greedy(client, model_id, STORY, max_tokens=24)
    b = greedy(client, model_id, STORY, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_seeded_sampling_is_deterministic(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(temperature=1.0, seed=42, max_tokens=24)
    a = chat(client, model_id, STORY, **kw)
    b = chat(client, model_id, STORY, **kw)
    assert a.choices[0].message.content
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stream_matches_non_stream(client: openai.OpenAI, model_id: str) -> None:
    reference = greedy(client, model_id, STORY, max_tokens=24)
    stream = greedy(
        client,
        model_id,
        STORY,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks, "stream produced no chunks"
    assert len({c.id for c in chunks}) == 1, "chunks do not share one id"
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    assert text == reference.choices[0].message.content

    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishing) == 1
    assert finishing[0].choices[0].finish_reason == reference.choices[0].finish_reason

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == reference.usage.completion_tokens
    assert last.usage.prompt_tokens == reference.usage.prompt_tokens
    # Only the final chunk carries usage.
    assert all(c.usage is None for c in chunks[:-1])


def _stop_word(text: str) -> str:
    """A word of `text` whose first occurrence is after position 0."""
    for word in re.findall(r"[A-Za-z]{3,}", text):
        if text.find(word) > 0:
            return word
    for word in text.split():
        if text.find(word) > 0:
            return word
    for start in range(1, len(text)):
        piece = text[start:].strip()[:1]
        if piece and text.find(piece) > 0:
            return piece
    raise AssertionError(f"no usable stop word in {text!r}")


def test_stop_sequence_truncates(client: openai.OpenAI, model_id: str) -> None:
    full = greedy(client, model_id, STORY, max_tokens=32).choices[0].message.content
    assert full and len(full) >= 2, f"reference generation too short: {full!r}"
    word = _stop_word(full)
    resp = greedy(client, model_id, STORY, max_tokens=32, stop=[word])
    choice = resp.choices[0]
    assert choice.message.content == full[: full.find(word)], f"stop word {word!r}"
    assert choice.finish_reason == "stop"
    assert word not in choice.message.content


def test_max_tokens_one(client: openai.OpenAI, model_id: str) -> None:
    resp = greedy(client, model_id, STORY, max_tokens=1)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 1


# ---------------------------------------------------------------------------------------------
# legacy completions


def test_completions_non_stream_and_stream(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The capital of France is"
    resp = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert isinstance(resp, Completion)
    assert len(resp.choices) == 1
    text = resp.choices[0].text
    assert isinstance(text, str) and text != ""
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        greedy(client, "no-such-model-souverain-test", HELLO, max_tokens=4)
    assert exc.value.status_code == 404


def test_empty_messages_is_400(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        greedy(client, model_id, [], max_tokens=4)
    assert exc.value.status_code == 400


def test_temperature_out_of_range_is_400(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, model_id, HELLO, temperature=5, max_tokens=4)
    assert exc.value.status_code == 400


def test_prompt_longer_than_context_is_400(client: openai.OpenAI, model_id: str) -> None:
    # 40,000 words: far beyond the default model's 8192-token context.
    huge = [{"role": "user", "content": "hello " * 40_000}]
    with pytest.raises(openai.BadRequestError) as exc:
        greedy(client, model_id, huge, max_tokens=4)
    assert exc.value.status_code == 400
    assert "context" in str(exc.value).lower()


def test_malformed_json_is_400_with_error_body(server: Server) -> None:
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=30)
    assert exc.value.code == 400
    body = json.loads(exc.value.read().decode("utf-8"))
    assert isinstance(body, dict)
    assert "error" in body


def test_health_is_200(server: Server) -> None:
    with urllib.request.urlopen(f"{server.root_url}/health", timeout=10) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------------------------------
# cancellation


def test_closing_a_stream_frees_the_server(client: openai.OpenAI, model_id: str) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    stream = chat(
        client, model_id, messages, temperature=0, max_tokens=2000, stream=True
    )
    received = 0
    for _chunk in stream:
        received += 1
        if received == 3:
            break
    assert received == 3
    stream.response.close()

    # The engine serves one request at a time: this only completes in time if the
    # abandoned generation was cancelled.
    started = time.monotonic()
    resp = client.with_options(timeout=60.0).chat.completions.create(
        model=model_id, messages=HELLO, temperature=0, max_tokens=4
    )
    elapsed = time.monotonic() - started
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage.completion_tokens <= 4
    assert elapsed < 60.0


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.root_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def test_tokenize_matches_llama_cpp_and_detokenize_inverts_it(server: Server) -> None:
    # llama.cpp's ids for this text on SmolLM2 (crates/model/tests/golden, first case).
    out = _post(server, "/tokenize", {"prompt": "The capital of France is"})
    assert out["tokens"] == [504, 3575, 282, 4649, 314]
    assert out["count"] == 5
    assert out["max_model_len"] >= 2048
    back = _post(server, "/detokenize", {"tokens": out["tokens"]})
    assert back["prompt"] == "The capital of France is"
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    text = _post(server, "/detokenize", {"tokens": chat["tokens"]})["prompt"]
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_metrics_count_requests(server: Server, client: openai.OpenAI, model_id: str) -> None:
    greedy(client, model_id, [{"role": "user", "content": "Say hi."}], max_tokens=2)
    with urllib.request.urlopen(f"{server.root_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert re.search(r"^souverain_generation_tokens_total\{[^}]*\} [1-9]", text, re.M), text
    assert "vllm:num_requests_running" in text
