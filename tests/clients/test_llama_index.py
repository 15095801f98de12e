"""LlamaIndex against `souverain serve`: its `OpenAILike` LLM, as applications point it at an
OpenAI-compatible server.

Checked: `complete` and `chat` on a chat model go to /v1/chat/completions and give the same
greedy answer; `stream_complete` and `stream_chat` assemble the non-streamed text; a completion
model (`is_chat_model=False`) goes to /v1/completions, streamed alike; `structured_predict`
returns a validated Pydantic instance when the LLM sends the model's JSON schema as
`response_format`; a forced tool call parses, through the LLM's own tool-call reader, into a
valid instance; an unknown model is `openai.NotFoundError`.

Not covered, for want of packages in the suite's venv: embeddings (`llama-index-embeddings-openai`
is not installed) and `structured_predict` through function calling (llama-index-llms-openai
0.1.27 imports it from `llama-index-agent-openai`, not installed, and sends `tool_choice: auto`,
which does not force the call).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import nltk
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import Server

# Importing llama_index.core fetches NLTK's punkt data when it is missing (every import path goes
# through llama_index/core/__init__.py); nothing here splits sentences, so nothing is fetched.
_nltk_download = nltk.download
nltk.download = lambda *args, **kwargs: False
try:
    from llama_index.core.llms import ChatMessage, MessageRole
    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike
finally:
    nltk.download = _nltk_download

# llama-index 0.10 parses structured output with pydantic's v1-style methods.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")

STORY = "Tell me a short story about a cat who learns to fly."
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]
    temperature: int = Field(ge=-50, le=60)


class Wire:
    """Records the path and JSON body of every request an LLM's client sends."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def record(self, request: httpx.Request) -> None:
        self.requests.append((request.url.path, json.loads(request.content)))

    def llm(self, server: Server, **kw: Any) -> OpenAILike:
        args: dict[str, Any] = dict(
            model=server.model,
            api_base=server.base_url,
            api_key="x",
            is_chat_model=True,
            temperature=0,
            max_tokens=MAX_TOKENS,
            context_window=8192,
            max_retries=0,
            http_client=httpx.Client(event_hooks={"request": [self.record]}, timeout=120),
        )
        args.update(kw)
        return OpenAILike(**args)


@pytest.fixture
def wire() -> Wire:
    return Wire()


def test_complete_and_chat_give_the_same_answer(server: Server, wire: Wire) -> None:
    llm = wire.llm(server)
    completion = llm.complete(QUESTION)
    reply = llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
    assert isinstance(completion.text, str) and completion.text
    assert reply.message.role == MessageRole.ASSISTANT
    assert reply.message.content == completion.text
    assert [path for path, _ in wire.requests] == ["/v1/chat/completions"] * 2
    for _, body in wire.requests:
        assert body["messages"] == [{"role": "user", "content": QUESTION}]
        assert body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0
    usage = reply.raw.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS


def test_stream_complete_assembles_complete(server: Server, wire: Wire) -> None:
    llm = wire.llm(server)
    whole = llm.complete(STORY).text
    chunks = list(llm.stream_complete(STORY))
    assert len(chunks) > 1
    assert "".join(c.delta for c in chunks) == whole
    assert chunks[-1].text == whole
    assert wire.requests[-1][1]["stream"] is True


def test_stream_chat_assembles_chat(server: Server, wire: Wire) -> None:
    llm = wire.llm(server)
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="You are a storyteller."),
        ChatMessage(role=MessageRole.USER, content=STORY),
    ]
    whole = llm.chat(messages).message.content
    chunks = list(llm.stream_chat(messages))
    assert len(chunks) > 1
    assert "".join(c.delta for c in chunks) == whole
    assert chunks[-1].message.content == whole
    assert chunks[-1].message.role == MessageRole.ASSISTANT


def test_completion_model_uses_the_completions_endpoint(server: Server, wire: Wire) -> None:
    llm = wire.llm(server, is_chat_model=False)
    prompt = "The capital of France is"
    whole = llm.complete(prompt)
    streamed = "".join(c.delta for c in llm.stream_complete(prompt))
    assert whole.text and streamed == whole.text
    assert [path for path, _ in wire.requests] == ["/v1/completions"] * 2
    assert wire.requests[0][1]["prompt"] == prompt
    assert 0 < whole.raw.usage.completion_tokens <= MAX_TOKENS


def test_structured_predict_with_response_format_validates(server: Server, wire: Wire) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "Weather", "schema": Weather.model_json_schema()},
    }
    llm = wire.llm(server, max_tokens=80, additional_kwargs={"response_format": response_format})
    weather = llm.structured_predict(
        Weather, PromptTemplate("Report the weather: {text}"), text="It is 21 degrees celsius in Paris."
    )
    assert isinstance(weather, Weather)
    assert weather.city
    ((path, body),) = wire.requests
    assert path == "/v1/chat/completions"
    assert body["response_format"] == response_format
    assert "It is 21 degrees celsius in Paris." in body["messages"][-1]["content"]


def test_forced_tool_call_parses_into_a_valid_instance(server: Server, wire: Wire) -> None:
    llm = wire.llm(server, max_tokens=80, is_function_calling_model=True)
    tool = {
        "type": "function",
        "function": {
            "name": "report_weather",
            "description": Weather.__doc__,
            "parameters": Weather.model_json_schema(),
        },
    }
    reply = llm.chat(
        [ChatMessage(role=MessageRole.USER, content="It is 21 degrees celsius in Paris.")],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "report_weather"}},
        parallel_tool_calls=False,
    )
    assert reply.raw.choices[0].finish_reason == "tool_calls"
    (selection,) = llm.get_tool_calls_from_response(reply)
    assert selection.tool_name == "report_weather"
    assert selection.tool_id.startswith("call_")
    weather = Weather.model_validate(selection.tool_kwargs)
    assert weather.city


def test_unknown_model_raises_not_found(server: Server, wire: Wire) -> None:
    llm = wire.llm(server, model="no-such-model")
    with pytest.raises(openai.NotFoundError) as info:
        llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert len(wire.requests) == 1  # max_retries=0: no second try
