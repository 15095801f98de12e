"""Anthropic's Messages API through the official `anthropic` SDK, against the default model
(SmolLM2-135M): a tiny model, so the assertions are about shapes and agreement (stream equals
whole at temperature 0, a forced call parses under its schema), not about what it says.
"""

from __future__ import annotations

from typing import Iterator

import anthropic
import jsonschema
import pytest

from conftest import Server

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a cat."}]
# This SDK's `create` has no sampling arguments any more; the API still takes them, so they
# go in the body as extra fields.
GREEDY = {"temperature": 0}


def _client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.root_url, api_key="unused", max_retries=0, timeout=120.0
    )


@pytest.fixture(scope="module")
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    with _client(server) as client:
        yield client


def test_create_has_anthropics_shape(claude: anthropic.Anthropic, model_id: str) -> None:
    msg = claude.messages.create(
        model=model_id,
        max_tokens=16,
        system="You are a helpful assistant.",
        messages=STORY,
        extra_body=GREEDY,
        metadata={"user_id": "sdk-test"},
    )
    assert msg.id.startswith("msg_")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == model_id
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 10
    assert 0 < msg.usage.output_tokens <= 16


def test_stream_assembles_to_the_whole_message(claude: anthropic.Anthropic, model_id: str) -> None:
    kwargs = dict(model=model_id, max_tokens=24, messages=STORY, extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequence_is_named(claude: anthropic.Anthropic, model_id: str) -> None:
    full = claude.messages.create(
        model=model_id, max_tokens=32, messages=STORY, extra_body=GREEDY
    ).content[0].text
    words = [w for w in full.split() if len(w) > 2]
    assert len(words) >= 2, f"reference generation too short: {full!r}"
    word = words[1]
    msg = claude.messages.create(
        model=model_id, max_tokens=32, messages=STORY, extra_body=GREEDY, stop_sequences=[word]
    )
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == word
    assert msg.content[0].text == full[: full.find(word)]


def test_forced_tool_round_trip(claude: anthropic.Anthropic, model_id: str) -> None:
    forced = dict(
        model=model_id,
        max_tokens=64,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    msg = claude.messages.create(**forced)
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])

    # The call streams as input_json_delta fragments that assemble to the same input.
    with claude.messages.stream(**forced) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == [b.type for b in msg.content]
    assert streamed.content[-1].input == call.input

    history = ASK + [
        {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "21 degrees, sunny"}
            ],
        },
    ]
    answer = claude.messages.create(
        model=model_id, max_tokens=24, messages=history, tools=[WEATHER], extra_body=GREEDY
    )
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert answer.content
    # The call and its result are in the prompt.
    longer = claude.messages.count_tokens(model=model_id, messages=history, tools=[WEATHER])
    shorter = claude.messages.count_tokens(model=model_id, messages=ASK, tools=[WEATHER])
    assert longer.input_tokens > shorter.input_tokens + 10
    assert answer.usage.input_tokens == longer.input_tokens


def test_count_tokens_matches_the_prompt(claude: anthropic.Anthropic, model_id: str) -> None:
    counted = claude.messages.count_tokens(model=model_id, messages=STORY)
    msg = claude.messages.create(model=model_id, max_tokens=1, messages=STORY)
    assert counted.input_tokens == msg.usage.input_tokens > 0


def test_errors_are_anthropic_errors(claude: anthropic.Anthropic, model_id: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as missing:
        claude.messages.create(model=model_id, messages=STORY, max_tokens=anthropic.omit)
    assert missing.value.status_code == 400
    body = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match="text only"):
        claude.messages.create(
            model=model_id, max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=4, messages=STORY)


def test_thinking_comes_as_thinking_blocks(thinking_server: Server) -> None:
    # The thinking template opens a <think> block: the first output is reasoning.
    with _client(thinking_server) as client:
        kwargs = dict(
            model=thinking_server.model_id, max_tokens=16, messages=STORY, extra_body=GREEDY
        )
        whole = client.messages.create(**kwargs)
        assert whole.content[0].type == "thinking"
        assert whole.content[0].thinking
        with client.messages.stream(**kwargs) as stream:
            thinking = "".join(
                e.delta.thinking
                for e in stream
                if e.type == "content_block_delta" and e.delta.type == "thinking_delta"
            )
        assert thinking == whole.content[0].thinking
