"""LiteLLM's OpenAI-compatible provider (`openai/<model>` with `api_base`) against the server:
whole and streamed completions (the stream rebuilds the whole answer, usage included when asked
for), async completion, a forced tool call and a json_schema response format that validate
against their schemas, embeddings equal to `/v1/embeddings`'s, and an unknown model raised as
LiteLLM's NotFoundError without retries.

Greedy decoding keeps the small chat model's answers deterministic. LiteLLM reads its bundled
cost map (conftest sets LITELLM_LOCAL_MODEL_COST_MAP), so nothing here reaches the internet.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import jsonschema
import litellm
import pytest

from conftest import Server

litellm.suppress_debug_info = True

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def complete(server: Server, messages: list[dict], **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return litellm.completion(
        model=f"openai/{server.model}", api_base=server.base_url, api_key="x",
        messages=messages, num_retries=0, **kw,
    )


def direct_embeddings(server: Server, texts: list[str]) -> list[list[float]]:
    body = json.dumps({"model": server.embedding_model, "input": texts}).encode()
    req = urllib.request.Request(
        f"{server.base_url}/embeddings", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        data = json.loads(r.read())["data"]
    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


# ---------------------------------------------------------------------------------------------
# chat


def test_completion_answers_with_usage(server: Server) -> None:
    r = complete(server, QUESTION)
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_rebuilds_the_whole_answer(server: Server) -> None:
    whole = complete(server, QUESTION)
    chunks = list(
        complete(server, QUESTION, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [f for f in finish if f]
    assert finish == [whole.choices[0].finish_reason]
    usages = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usages, "include_usage gave no usage chunk"
    assert usages[-1].prompt_tokens == whole.usage.prompt_tokens
    assert usages[-1].completion_tokens == whole.usage.completion_tokens
    built = litellm.stream_chunk_builder(chunks, messages=QUESTION)
    assert built.choices[0].message.content == whole.choices[0].message.content
    assert built.usage.completion_tokens == whole.usage.completion_tokens


def test_async_completion_equals_sync(server: Server) -> None:
    whole = complete(server, QUESTION)

    async def ask():
        return await litellm.acompletion(
            model=f"openai/{server.model}", api_base=server.base_url, api_key="x",
            messages=QUESTION, temperature=0, max_tokens=16, num_retries=0,
        )

    r = asyncio.run(ask())
    assert r.choices[0].message.content == whole.choices[0].message.content
    assert r.usage.completion_tokens == whole.usage.completion_tokens


def test_forced_tool_call_validates(server: Server) -> None:
    r = complete(
        server, ASK_WEATHER, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_call_streams_the_same_arguments(server: Server) -> None:
    kw = dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    whole = complete(server, ASK_WEATHER, **kw)
    (call,) = whole.choices[0].message.tool_calls
    arguments, names, finish = "", "", None
    for chunk in complete(server, ASK_WEATHER, stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                names += (d.function and d.function.name) or ""
                arguments += (d.function and d.function.arguments) or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert names == call.function.name == "get_weather"
    assert json.loads(arguments) == json.loads(call.function.arguments)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


# 40 tokens cut the default model's second call inside its opening tag, 80 its third.
@pytest.mark.parametrize("max_tokens", [40, 80])
def test_parallel_calls_cut_by_max_tokens_leak_no_markup(server: Server, max_tokens: int) -> None:
    """With parallel calls allowed the model calls again and again until `max_tokens`; the
    calls it finished validate, and a call cut before its name is dropped, not content."""
    kw = dict(tools=[WEATHER], tool_choice="required", max_tokens=max_tokens)
    whole = complete(server, ASK_WEATHER, **kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.content, choice.message.content
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    content = ""
    for chunk in complete(server, ASK_WEATHER, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
    assert content == "", content


def test_json_schema_response_validates(server: Server) -> None:
    r = complete(
        server, [{"role": "user", "content": "Alice is 30 years old. Extract the person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": True, "schema": PERSON},
        },
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


# ---------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_equal_the_endpoints(server: Server) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    r = litellm.embedding(
        model=f"openai/{server.embedding_model}", api_base=server.base_url, api_key="x",
        input=texts, num_retries=0,
    )
    got = [d["embedding"] for d in sorted(r.data, key=lambda d: d["index"])]
    direct = direct_embeddings(server, texts)
    assert len(got) == len(direct) == 2
    for a, b in zip(got, direct):
        assert len(a) == len(b) > 0
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    assert r.usage.prompt_tokens > 0


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_model_is_not_found(server: Server) -> None:
    with pytest.raises(litellm.NotFoundError) as e:
        litellm.completion(
            model="openai/no-such-model", api_base=server.base_url, api_key="x",
            messages=QUESTION, max_tokens=4, num_retries=0,
        )
    assert e.value.status_code == 404
    assert "no-such-model" in str(e.value)
