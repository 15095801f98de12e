"""The OpenAI Agents SDK against `souverain serve`, on both of its OpenAI model paths: Chat
Completions (`OpenAIChatCompletionsModel`) and the Responses API (`OpenAIResponsesModel`).

Checked: a plain run's final output is the server's text; an `output_type` comes back as a
validated instance (the SDK sends it as a strict `response_format` json_schema, or on the
Responses path as `text.format`), also after a forced tool call, when the first request carries
both the schema and `tool_choice: required`; a function tool forced by name (or by `required`)
is called with arguments that fit its signature and, with `stop_on_first_tool`, its return is
the final output; a streamed run's raw text deltas assemble the non-streamed final output, and
a streamed forced call is the non-streamed one; an
unknown model is `openai.NotFoundError`. Tracing is off: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from openai.types.responses import ResponseTextDeltaEvent
from pydantic import BaseModel, Field

from conftest import Server

set_tracing_disabled(True)

QUESTION = "What is the capital of France?"
STORY = "Tell me a short story about a cat who learns to fly."


class Weather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]
    temperature: int = Field(ge=-50, le=60)


class Wire:
    """An AsyncOpenAI client on the server that records the path and JSON body of each request."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.requests: list[tuple[str, dict[str, Any]]] = []

        async def record(request: httpx.Request) -> None:
            self.requests.append((request.url.path, json.loads(request.content)))

        self.client = openai.AsyncOpenAI(
            base_url=server.base_url,
            api_key="x",
            max_retries=0,
            http_client=httpx.AsyncClient(event_hooks={"request": [record]}, timeout=120),
        )

    def chat(self, model: str | None = None) -> OpenAIChatCompletionsModel:
        return OpenAIChatCompletionsModel(model=model or self.server.model, openai_client=self.client)

    def responses(self) -> OpenAIResponsesModel:
        return OpenAIResponsesModel(model=self.server.model, openai_client=self.client)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.requests]


@pytest.fixture
def wire(server: Server) -> Wire:
    return Wire(server)


def greedy(max_tokens: int, **kw: Any) -> ModelSettings:
    return ModelSettings(temperature=0, max_tokens=max_tokens, **kw)


def order_tool(calls: list[int]):
    @function_tool
    def get_order_status(order_id: int) -> str:
        """The shipping status of an order."""
        calls.append(order_id)
        return f"Order {order_id} was delivered."

    return get_order_status


def only_call(result) -> dict[str, Any]:
    """The arguments of the run's one tool call, which the SDK's items must record."""
    (item,) = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    assert item.raw_item.name == "get_order_status"
    return json.loads(item.raw_item.arguments)


# ---------------------------------------------------------------------------------------------
# Chat Completions


def test_plain_answer_is_the_servers_text(server: Server, wire: Wire) -> None:
    agent = Agent(name="terse", instructions="You are terse.", model=wire.chat(),
                  model_settings=greedy(48))
    result = Runner.run_sync(agent, QUESTION)
    (body,) = wire.bodies
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": QUESTION},
    ]
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as direct:
        expected = direct.chat.completions.create(
            model=server.model, messages=body["messages"], temperature=0, max_tokens=48
        )
    assert isinstance(result.final_output, str) and result.final_output
    assert result.final_output == expected.choices[0].message.content
    usage = result.context_wrapper.usage
    assert usage.requests == 1
    assert usage.input_tokens == expected.usage.prompt_tokens > 0
    assert usage.output_tokens == expected.usage.completion_tokens > 0


def test_output_type_is_a_validated_instance(wire: Wire) -> None:
    agent = Agent(name="reporter", model=wire.chat(), output_type=Weather,
                  model_settings=greedy(80))
    result = Runner.run_sync(agent, "It is 21 degrees celsius in Paris. Report the weather.")
    assert isinstance(result.final_output, Weather)
    assert result.final_output.city
    (body,) = wire.bodies
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]


def test_output_type_after_a_required_tool_call(wire: Wire) -> None:
    calls: list[str] = []

    @function_tool
    def get_temperature(city: str) -> str:
        """The current temperature in a city, in degrees celsius."""
        calls.append(city)
        return f"It is 21 degrees celsius in {city}."

    agent = Agent(
        name="reporter",
        model=wire.chat(),
        output_type=Weather,
        tools=[get_temperature],
        model_settings=greedy(80, tool_choice="required", parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?")

    first, second = wire.bodies
    # The schema and the forced call in one request; then, the tool choice reset, the answer.
    assert first["tool_choice"] == "required" and "response_format" in first
    assert "tool_choice" not in second and second["response_format"] == first["response_format"]
    assert len(calls) == 1 and isinstance(calls[0], str)
    (call,) = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    assert json.loads(call.raw_item.arguments) == {"city": calls[0]}
    (output,) = [i for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert {"role": "tool", "tool_call_id": call.raw_item.call_id,
            "content": output.output} in second["messages"]
    assert isinstance(result.final_output, Weather)


@pytest.mark.parametrize("tool_choice", ["get_order_status", "required"])
def test_forced_tool_is_called_and_ends_the_run(wire: Wire, tool_choice: str) -> None:
    calls: list[int] = []
    agent = Agent(
        name="support",
        model=wire.chat(),
        tools=[order_tool(calls)],
        tool_use_behavior="stop_on_first_tool",
        model_settings=greedy(80, tool_choice=tool_choice, parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "What is the status of order 1234?")
    (body,) = wire.bodies
    expected_choice = (
        {"type": "function", "function": {"name": "get_order_status"}}
        if tool_choice == "get_order_status" else "required"
    )
    assert body["tool_choice"] == expected_choice
    assert len(calls) == 1 and isinstance(calls[0], int)
    assert only_call(result) == {"order_id": calls[0]}
    assert result.final_output == f"Order {calls[0]} was delivered."


def run_then_stream(agent: Agent, prompt: str) -> tuple[Any, Any, list[str]]:
    """A run, then a streamed run of the same prompt with the raw text deltas it streamed (in one
    event loop, which the client's connections belong to)."""

    async def go() -> tuple[Any, Any, list[str]]:
        whole = await Runner.run(agent, prompt)
        streamed = Runner.run_streamed(agent, prompt)
        deltas = [
            event.data.delta
            async for event in streamed.stream_events()
            if event.type == "raw_response_event"
            and isinstance(event.data, ResponseTextDeltaEvent)
        ]
        return whole, streamed, deltas

    return asyncio.run(go())


def test_streamed_deltas_assemble_the_final_output(wire: Wire) -> None:
    agent = Agent(name="storyteller", model=wire.chat(), model_settings=greedy(24))
    whole, streamed, deltas = run_then_stream(agent, STORY)
    assert len(deltas) > 1
    assert "".join(deltas) == whole.final_output
    assert streamed.final_output == whole.final_output
    assert wire.bodies[-1]["stream"] is True


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_streamed_forced_tool_call_is_the_non_streamed_one(wire: Wire, api: str) -> None:
    calls: list[int] = []
    agent = Agent(
        name="support",
        model=getattr(wire, api)(),
        tools=[order_tool(calls)],
        tool_use_behavior="stop_on_first_tool",
        model_settings=greedy(80, tool_choice="required", parallel_tool_calls=False),
    )
    whole, streamed, _ = run_then_stream(agent, "What is the status of order 1234?")
    assert wire.bodies[-1]["stream"] is True
    assert len(calls) == 2 and calls[0] == calls[1]
    assert only_call(streamed) == only_call(whole) == {"order_id": calls[0]}
    assert streamed.final_output == whole.final_output == f"Order {calls[0]} was delivered."


def test_unknown_model_raises_not_found(wire: Wire) -> None:
    agent = Agent(name="lost", model=wire.chat("no-such-model"), model_settings=greedy(8))
    with pytest.raises(openai.NotFoundError) as info:
        Runner.run_sync(agent, QUESTION)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


# ---------------------------------------------------------------------------------------------
# Responses API


def test_responses_plain_answer_matches_chat_completions(wire: Wire) -> None:
    kw = dict(name="terse", instructions="You are terse.", model_settings=greedy(48))
    via_responses = Runner.run_sync(Agent(model=wire.responses(), **kw), QUESTION)
    via_chat = Runner.run_sync(Agent(model=wire.chat(), **kw), QUESTION)
    (path, body), _ = wire.requests
    assert path == "/v1/responses"
    assert body["instructions"] == "You are terse." and body["max_output_tokens"] == 48
    assert isinstance(via_responses.final_output, str) and via_responses.final_output
    assert via_responses.final_output == via_chat.final_output
    usage = via_responses.context_wrapper.usage
    assert usage.requests == 1 and usage.input_tokens > 0 and usage.output_tokens > 0


def test_responses_forced_tool_is_called(wire: Wire) -> None:
    calls: list[int] = []
    agent = Agent(
        name="support",
        model=wire.responses(),
        tools=[order_tool(calls)],
        tool_use_behavior="stop_on_first_tool",
        model_settings=greedy(80, tool_choice="get_order_status", parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "What is the status of order 1234?")
    ((path, body),) = wire.requests
    assert path == "/v1/responses"
    assert body["tool_choice"] == {"type": "function", "name": "get_order_status"}
    assert len(calls) == 1 and isinstance(calls[0], int)
    assert only_call(result) == {"order_id": calls[0]}
    assert result.final_output == f"Order {calls[0]} was delivered."


def test_responses_output_type_after_a_tool_call(wire: Wire) -> None:
    calls: list[int] = []
    agent = Agent(
        name="support",
        model=wire.responses(),
        tools=[order_tool(calls)],
        output_type=Weather,
        model_settings=greedy(80, tool_choice="required", parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "Order 1234 is in Paris, where it is 21 degrees celsius.")
    assert len(calls) == 1
    first, second = wire.bodies
    assert first["tool_choice"] == "required"
    assert first["text"]["format"]["type"] == "json_schema"
    (call,) = [i for i in result.new_items if isinstance(i, ToolCallItem)]
    outputs = [item for item in second["input"] if item.get("type") == "function_call_output"]
    assert outputs == [{"type": "function_call_output", "call_id": call.raw_item.call_id,
                        "output": f"Order {calls[0]} was delivered."}]
    assert isinstance(result.final_output, Weather)


def test_responses_streamed_deltas_assemble_the_final_output(wire: Wire) -> None:
    agent = Agent(name="terse", instructions="You are terse.", model=wire.responses(),
                  model_settings=greedy(48))
    whole, streamed, deltas = run_then_stream(agent, QUESTION)
    assert len(deltas) > 1
    assert "".join(deltas) == whole.final_output
    assert streamed.final_output == whole.final_output
    path, body = wire.requests[-1]
    assert path == "/v1/responses" and body["stream"] is True
