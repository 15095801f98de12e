"""Mistral's official SDK (`mistralai`) against `souverain serve`: what broke for its users.

- `embeddings.create` parses the answer (Mistral's schema requires an `id`);
- `tool_choice="any"` (Mistral's word for OpenAI's `required`) forces a call to a tool, whose
  arguments are valid JSON for its parameters;
- a forced call sent together with a `response_format` (as agents with an output type send it)
  is answered with the call, not refused;
- a stream ends with usage without being asked (Mistral's API always sends it), and the
  usage agrees with the same request answered whole.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import pytest
from mistralai.client import Mistral

if TYPE_CHECKING:
    from conftest import Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def mistral(server: Server) -> Mistral:
    return Mistral(api_key="unused", server_url=server.root_url, timeout_ms=120_000)


def test_embeddings_parse_with_the_mistral_sdk(server: Server, mistral: Mistral) -> None:
    if server.embedding_model_id is None:
        pytest.skip("no embedding model served (set SOUVERAIN_EMBEDDING_MODEL)")
    answer = mistral.embeddings.create(
        model=server.embedding_model_id, inputs=["Paris is in France.", "Bonjour"]
    )
    assert answer.id.startswith("embd-")
    assert [d.index for d in answer.data] == [0, 1]
    for item in answer.data:
        vector = item.embedding
        assert len(vector) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    assert answer.usage.prompt_tokens > 0


def test_a_stream_ends_with_usage_unasked(server: Server, mistral: Mistral) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = mistral.chat.complete(
        model=server.model_id, messages=messages, max_tokens=12, temperature=0
    )
    events = list(
        mistral.chat.stream(model=server.model_id, messages=messages, max_tokens=12, temperature=0)
    )
    chunks = [event.data for event in events]
    assert chunks, "no chunks"
    *earlier, last = chunks
    assert all(chunk.usage is None for chunk in earlier)
    assert last.choices and last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert last.usage.completion_tokens == whole.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


@pytest.mark.parametrize("response_format", [None, {"type": "json_object"}])
def test_tool_choice_any_forces_a_valid_call(
    server: Server, mistral: Mistral, response_format: dict | None
) -> None:
    answer = mistral.chat.complete(
        model=server.model_id,
        messages=[{"role": "user", "content": "What is the weather like in Lyon?"}],
        tools=[WEATHER],
        tool_choice="any",
        parallel_tool_calls=False,
        response_format=response_format,
        temperature=0,
        max_tokens=64,
    )
    message = answer.choices[0].message
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = call.function.arguments
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    assert isinstance(arguments.get("city"), str)
    assert answer.choices[0].finish_reason == "tool_calls"
