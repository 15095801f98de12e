"""OpenAI's Responses API through the official `openai` SDK (`client.responses`), against the
default model (SmolLM2-135M): a tiny model, so the assertions are about shapes, event order and
agreement (stream equals whole at temperature 0, a forced call and a JSON schema parse and
validate), not about what it says.

Without `--auth` nothing is stored: `store: true` is refused, `previous_response_id` and
`retrieve` are 404s. The stored half runs `serve --auth` on a data directory made with
`souverain admin`: one project whose retention allows storing, one with zero retention (the
default), and another organisation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import jsonschema
import openai
import pytest

from conftest import Server, THINKING_TEMPLATE, _serve, admin

STORY = "Tell me a short story about a cat."
WEATHER = {
    "type": "function",
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
    "strict": True,
}
FORCED_WEATHER = {"type": "function", "name": "get_weather"}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def _message_texts(response) -> list[str]:
    return [
        part.text
        for item in response.output
        if item.type == "message"
        for part in item.content
        if part.type == "output_text"
    ]


# ---- without --auth ---------------------------------------------------------------------------


def test_create_has_openais_shape(client: openai.OpenAI, model_id: str) -> None:
    r = client.responses.create(
        model=model_id,
        input=STORY,
        instructions="You are a helpful assistant.",
        max_output_tokens=24,
        temperature=0,
        metadata={"suite": "sdk"},
        user="tester",
    )
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.model == model_id
    assert [item.type for item in r.output] == ["message"]
    message = r.output[0]
    assert message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"]
    assert r.output_text and r.output_text == message.content[0].text
    assert r.instructions == "You are a helpful assistant."
    assert r.metadata == {"suite": "sdk"} and r.user == "tester"
    assert r.max_output_tokens == 24 and r.temperature == 0
    # No control plane: nothing is stored, and the response says so.
    assert r.store is False
    u = r.usage
    assert u.input_tokens > 10 and 0 < u.output_tokens <= 24
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_instructions_come_before_the_input(client: openai.OpenAI, model_id: str) -> None:
    """`instructions` is the system message: the same prompt, and the same greedy answer, as
    the chat completion that sends it so."""
    told = "Answer in one word, in French."
    r = client.responses.create(
        model=model_id, input="Name a colour.", instructions=told, max_output_tokens=8, temperature=0
    )
    chat = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": told},
            {"role": "user", "content": "Name a colour."},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content
    bare = client.responses.create(model=model_id, input="Name a colour.", max_output_tokens=8)
    assert bare.instructions is None
    assert bare.usage.input_tokens != r.usage.input_tokens


def test_stream_events_come_in_openais_order(client: openai.OpenAI, model_id: str) -> None:
    # An answer that ends by itself: the stream helper's final response needs
    # `response.completed`.
    kwargs = dict(model=model_id, input="Say hello.", max_output_tokens=64, temperature=0)
    whole = client.responses.create(**kwargs)
    assert whole.status == "completed"
    types: list[str] = []
    numbers: list[int] = []
    text = ""
    with client.responses.stream(**kwargs) as stream:
        for event in stream:
            types.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert numbers == list(range(len(types)))
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert text == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stream_true_yields_the_events_and_the_whole_response(
    client: openai.OpenAI, model_id: str
) -> None:
    events = list(
        client.responses.create(
            model=model_id, input=STORY, max_output_tokens=12, temperature=0, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == text
    assert last.response.output_text == text
    assert last.response.id == events[0].response.id


def test_max_output_tokens_makes_an_incomplete_response(
    client: openai.OpenAI, model_id: str
) -> None:
    kwargs = dict(model=model_id, input=STORY, max_output_tokens=3, temperature=0)
    r = client.responses.create(**kwargs)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    assert r.output[0].status == "incomplete"
    events = list(client.responses.create(stream=True, **kwargs))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


def test_function_tool_round_trip(client: openai.OpenAI, model_id: str) -> None:
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    forced = dict(
        model=model_id,
        input=ask,
        tools=[WEATHER],
        tool_choice=FORCED_WEATHER,
        temperature=0,
        max_output_tokens=80,
    )
    first = client.responses.create(**forced)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1, first.output
    (call,) = calls
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tools[0].name == "get_weather"
    assert first.tool_choice.name == "get_weather"

    # The call streams as argument deltas that make the same arguments.
    pieces: list[str] = []
    done = None
    with client.responses.stream(**forced) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
            elif event.type == "response.function_call_arguments.done":
                done = event.arguments
        final = stream.get_final_response()
    assert len(pieces) >= 2 and "".join(pieces) == done == call.arguments
    assert [i.type for i in final.output if i.type == "function_call"] == ["function_call"]

    # The call and its output go back; the model answers in text.
    follow = client.responses.create(
        model=model_id,
        input=[
            *ask,
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=24,
    )
    assert [item.type for item in follow.output] == ["message"]
    assert follow.output_text
    # The same conversation as a chat completion: the same prompt and greedy answer.
    chat = client.chat.completions.create(
        model=model_id,
        messages=[
            *ask,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "21 C, sunny"},
        ],
        tools=[{"type": "function", "function": {
            k: v for k, v in WEATHER.items() if k != "type"
        }}],
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == chat.choices[0].message.content


def test_json_schema_format_parses_and_validates(client: openai.OpenAI, model_id: str) -> None:
    r = client.responses.create(
        model=model_id,
        input="Give the largest city of France and its population as JSON.",
        text={
            "format": {
                "type": "json_schema",
                "name": "city",
                "schema": CITY_SCHEMA,
                "strict": True,
            }
        },
        temperature=0,
        max_output_tokens=300,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), CITY_SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"
    obj = client.responses.create(
        model=model_id,
        # The keys named: an open-shaped prompt may nest keys until the limit (see
        # test_structured_output.py's OBJECT_MESSAGES).
        input="Describe a person as a JSON object with the keys name and age.",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=300,
    )
    assert obj.status == "completed"
    assert isinstance(json.loads(obj.output_text), dict)


def test_nothing_is_stored_without_auth(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model_id, input="hi", store=True, max_output_tokens=4)
    error = refused.value.body
    assert error["param"] == "store" and "--auth" in error["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(
            model=model_id, input="hi", previous_response_id="resp_nothere", max_output_tokens=4
        )
    assert missing.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nothere")
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_nothere")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": "hi", "temperature": 7}, "temperature"),
    ],
)
def test_bad_input_is_an_openai_error(
    client: openai.OpenAI, model_id: str, body: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.post(
            "/responses", body={"model": model_id, **body}, cast_to=object
        )
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == param
    assert err.value.body["message"]


def test_reasoning_item_carries_the_thinking(thinking_server: Server) -> None:
    client, model = thinking_server.client, thinking_server.model_id
    kwargs = dict(model=model, input="Say hello.", temperature=0, max_output_tokens=12)
    r = client.responses.create(**kwargs)
    # Thinking on: the block is open from the first token (the model rarely closes it).
    assert r.output[0].type == "reasoning" and r.output[0].id.startswith("rs_")
    reasoning = r.output[0].content[0].text
    assert reasoning and "<think>" not in reasoning
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    streamed = ""
    for event in client.responses.create(stream=True, **kwargs):
        if event.type == "response.reasoning_text.delta":
            streamed += event.delta
    assert streamed == reasoning
    off = client.responses.create(reasoning={"effort": "none"}, **kwargs)
    assert [item.type for item in off.output] == ["message"]
    assert off.usage.output_tokens_details.reasoning_tokens == 0
    assert off.reasoning.effort == "none"


# ---- with --auth: stored responses --------------------------------------------------------


class Tenants:
    """The data directory, and a client per key of the stored half."""

    def __init__(self, data_dir: Path, server: Server, keys: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.server = server
        self.model_id = server.model_id
        self.clients = {
            name: openai.OpenAI(
                base_url=server.base_url, api_key=key, max_retries=0, timeout=120.0
            )
            for name, key in keys.items()
        }

    def stored_actions(self) -> list[str]:
        return [e["action"] for e in admin(self.data_dir, "audit", "list") if e["action"].startswith("response.")]


@pytest.fixture(scope="module")
def tenants() -> Iterator[Tenants]:
    with tempfile.TemporaryDirectory(prefix="souverain-responses-") as tmp:
        data_dir = Path(tmp)
        acme = admin(data_dir, "org", "create", "acme")["id"]
        keeper = admin(data_dir, "project", "create", acme, "keeper", "--retention-secs", "3600")
        forgetful = admin(data_dir, "project", "create", acme, "forgetful")
        other_org = admin(data_dir, "org", "create", "globex")["id"]
        other = admin(data_dir, "project", "create", other_org, "theirs", "--retention-secs", "3600")
        keys = {
            name: admin(data_dir, "key", "create", project["id"], name)["key"]
            for name, project in (("keeper", keeper), ("forgetful", forgetful), ("other", other))
        }
        args = ["--auth", "--data-dir", str(data_dir)]
        with _serve(args, None, api_key=keys["keeper"]) as server:
            yield Tenants(data_dir, server, keys)


def test_stored_responses_are_retrieved_continued_and_deleted(tenants: Tenants) -> None:
    client, model = tenants.clients["keeper"], tenants.model_id
    # No `store`: the project's retention allows storing, so it is stored.
    first = client.responses.create(
        model=model, input="My name is Ada. Say hello.", temperature=0, max_output_tokens=8
    )
    assert first.store is True
    got = client.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()

    # Continued: the earlier input and output come before the new input.
    second = client.responses.create(
        model=model,
        input="What is my name?",
        previous_response_id=first.id,
        store=True,
        temperature=0,
        max_output_tokens=8,
    )
    assert second.previous_response_id == first.id and second.store is True
    fresh = client.responses.create(
        model=model, input="What is my name?", store=False, temperature=0, max_output_tokens=8
    )
    assert fresh.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(fresh.id)
    # The earlier turn came first: the same prompt and greedy answer as the chat completion
    # that sends the whole conversation.
    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "My name is Ada. Say hello."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_tokens=8,
    )
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens > fresh.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == chat.choices[0].message.content
    # A chain of three, streamed: the second's conversation carries the first's.
    events = list(
        client.responses.create(
            model=model,
            input="Thanks.",
            previous_response_id=second.id,
            temperature=0,
            max_output_tokens=6,
            stream=True,
        )
    )
    third = events[-1].response
    assert third.store is True
    assert third.usage.input_tokens > second.usage.input_tokens
    assert client.responses.retrieve(third.id).output_text == third.output_text

    # Another organisation's key sees nothing of it.
    stranger = tenants.clients["other"]
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as err:
        stranger.responses.create(
            model=model, input="hi", previous_response_id=first.id, max_output_tokens=4
        )
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        stranger.responses.delete(first.id)
    assert client.responses.retrieve(first.id).id == first.id

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    # The later responses stand on their own.
    assert client.responses.retrieve(second.id).previous_response_id == first.id


def test_zero_retention_refuses_store(tenants: Tenants) -> None:
    client, model = tenants.clients["forgetful"], tenants.model_id
    before = tenants.stored_actions()
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input="hi", store=True, max_output_tokens=4)
    error = refused.value.body
    assert error["param"] == "store" and error["code"] == "zero_retention"
    assert "zero retention" in error["message"]
    # Without `store` it answers, and keeps nothing.
    r = client.responses.create(model=model, input="hi", max_output_tokens=4)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert tenants.stored_actions() == before


def test_bad_input_stores_and_meters_nothing(tenants: Tenants) -> None:
    client, model = tenants.clients["keeper"], tenants.model_id
    before_usage = admin(tenants.data_dir, "usage")
    before_actions = tenants.stored_actions()
    bad = [
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        {"input": "hi", "previous_response_id": "resp_missing"},
        {"input": "hi", "tool_choice": {"type": "function"}, "tools": [WEATHER]},
    ]
    for body in bad:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
            client.post("/responses", body={"model": model, **body}, cast_to=object)
    after_usage = admin(tenants.data_dir, "usage")
    new = after_usage[len(before_usage) :]
    assert len(new) == len(bad)
    assert all(u["status"] == "rejected" for u in new), new
    assert all(u["prompt_tokens"] == 0 and u["completion_tokens"] == 0 for u in new), new
    assert tenants.stored_actions() == before_actions
