"""Tool calling, reasoning, n > 1, echo, fill-in-the-middle refusals and GBNF grammars through the
official OpenAI SDK.

The default model's template knows no tools, so the server describes them in a system
message and asks for Hermes-style <tool_call> answers; `thinking_server` serves the same
model with a Hermes template that renders the tools itself and opens a <think> block.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from conftest import Server

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
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def check_call(call) -> dict:
    """A tool call as OpenAI shapes it, its arguments valid under the function's schema."""
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) > 10
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("seed", range(4))
def test_forced_named_call_validates(client: openai.OpenAI, model_id: str, seed: int) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=seed,
        max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_call(call)


def test_required_call_streams_like_openai(client: openai.OpenAI, model_id: str) -> None:
    kwargs = dict(
        model=model_id,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    whole = client.chat.completions.create(**kwargs)
    (call,) = whole.choices[0].message.tool_calls
    check_call(call)
    # Rebuild the calls from the deltas, as OpenAI's clients do.
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    slot["id"] = d.id
                if d.function and d.function.name:
                    slot["name"] += d.function.name
                if d.function and d.function.arguments:
                    slot["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"]
    assert calls[0]["name"] == call.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)


FORCED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def test_forced_call_arguments_stream_as_generated(client: openai.OpenAI, model_id: str) -> None:
    """The arguments come in several deltas, as OpenAI streams them (progressive UIs,
    instructor's partial objects), and make the whole response's arguments."""
    kwargs = dict(
        model=model_id,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=FORCED_WEATHER,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    whole = client.chat.completions.create(**kwargs)
    (call,) = whole.choices[0].message.tool_calls
    check_call(call)
    opening = None
    pieces: list[str] = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                if d.id:
                    # The opening delta: id, type and name, arguments still empty.
                    assert opening is None and not pieces
                    opening = d
                    assert d.type == "function"
                    assert d.function.name == "get_weather"
                    assert not d.function.arguments
                else:
                    assert opening is not None and not (d.function and d.function.name)
                    pieces.append(d.function.arguments)
    assert opening is not None
    assert len(pieces) > 1, pieces
    assert json.loads("".join(pieces)) == json.loads(call.function.arguments)


# 6 tokens cut the default model's forced call before its name, 20 inside its arguments.
@pytest.mark.parametrize(("max_tokens", "named"), [(6, False), (20, True)])
def test_call_cut_by_max_tokens_leaks_no_markup(
    client: openai.OpenAI, model_id: str, max_tokens: int, named: bool
) -> None:
    """A call cut by `max_tokens` is not content: with its name known it is a call with the
    arguments so far (finish_reason `length`, as OpenAI's), else it is dropped."""
    kwargs = dict(
        model=model_id,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=FORCED_WEATHER,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=max_tokens,
    )
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert "tool_call" not in (choice.message.content or "")
    calls = choice.message.tool_calls or []
    assert len(calls) == (1 if named else 0), calls
    for call in calls:
        assert call.function.name == "get_weather"
        # Cut: the start of the JSON, not all of it.
        assert call.function.arguments.startswith("{") or not call.function.arguments
        assert not call.function.arguments.endswith("}")
    streamed_content, streamed_arguments, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed_content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                streamed_arguments += (d.function and d.function.arguments) or ""
            finish = c.finish_reason or finish
    assert finish == "length"
    assert streamed_content == (choice.message.content or "")
    whole_arguments = "".join(c.function.arguments for c in calls)
    assert streamed_arguments == whole_arguments


def test_tool_results_in_the_history(client: openai.OpenAI, model_id: str) -> None:
    messages = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(
        model=model_id, messages=messages, tools=[WEATHER], temperature=0, max_tokens=24
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The history is in the prompt: longer than the question alone.
    short = client.chat.completions.create(
        model=model_id, messages=ASK, tools=[WEATHER], max_tokens=1
    )
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 20


def test_tool_choice_none_never_calls(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=16,
    )
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].message.content


def test_bad_tools_are_400s(client: openai.OpenAI, model_id: str) -> None:
    for tools, choice, param in [
        ([{"type": "function"}], "auto", "tools[0]"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=model_id, messages=ASK, tools=tools, tool_choice=choice, max_tokens=4
            )
        assert e.value.body["param"] == param


def test_hermes_template_renders_the_tools(thinking_server: Server) -> None:
    client, model = thinking_server.client, thinking_server.model_id
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        reasoning_effort="none",
        temperature=0.7,
        seed=3,
        max_tokens=80,
    )
    (call,) = r.choices[0].message.tool_calls
    check_call(call)
    bare = client.chat.completions.create(
        model=model, messages=ASK, reasoning_effort="none", max_tokens=1
    )
    assert r.usage.prompt_tokens > bare.usage.prompt_tokens + 40


REASONED = (
    '%llguidance {}\nstart: /[a-z]{1,9}( [a-z]{1,9}){2,6}/ "</think>" " " '
    '/[A-Z][a-z]{1,9}( [a-z]{1,9}){1,5}/ "."'
)


def test_reasoning_is_separated_and_streams_the_same(thinking_server: Server) -> None:
    client, model = thinking_server.client, thinking_server.model_id
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        temperature=0.8,
        seed=11,
        max_tokens=60,
        extra_body={"grammar": REASONED},
    )
    whole = client.chat.completions.create(**kwargs)
    msg = whole.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning and "</think>" not in reasoning and "<think>" not in reasoning
    assert msg.content and msg.content.endswith(".") and msg.content[0].isupper()
    details = whole.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < whole.usage.completion_tokens
    streamed_reasoning, streamed_content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed_reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            streamed_content += c.delta.content or ""
    assert streamed_reasoning == reasoning
    assert streamed_content == msg.content


def test_reasoning_can_be_switched_off(thinking_server: Server) -> None:
    client, model = thinking_server.client, thinking_server.model_id
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        reasoning_effort="none",
        temperature=0,
        max_tokens=12,
    )
    msg = r.choices[0].message
    assert not (msg.model_extra or {}).get("reasoning_content")
    assert msg.content
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    on = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=12,
    )
    # Thinking on: the block is open from the first token (the model rarely closes it).
    assert on.usage.completion_tokens_details.reasoning_tokens > 0
    assert (on.choices[0].message.model_extra or {}).get("reasoning_content")


def test_n_choices(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=8,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) >= 2
    alone = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=1.0,
        seed=5,
        max_tokens=8,
    )
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens
    assert r.choices[0].message.content == alone.choices[0].message.content
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=8,
        stream=True,
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_id, messages=ASK, n=0, max_tokens=2
        )


def test_echo_with_logprobs(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(
        model=model_id, prompt=prompt, echo=True, max_tokens=4, temperature=0
    )
    assert r.choices[0].text.startswith(prompt)
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0)
    assert r.choices[0].text == prompt + plain.choices[0].text
    r = client.completions.create(
        model=model_id, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_fill_in_the_middle_needs_fim_tokens(client: openai.OpenAI, model_id: str) -> None:
    # SmolLM2 has no fill-in-the-middle tokens (llama.cpp finds none either): both endpoints
    # refuse clearly. The working path is tested on a Mistral tokenizer in
    # crates/cli/tests/it/serve_dir.rs (ids equal to mistral-common's encode_fim).
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=model_id, prompt="def f(", suffix="\n    return x\n", max_tokens=4
        )
    assert "fill-in-the-middle" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.post(
            "/fim/completions",
            body={"model": model_id, "prompt": "def f(", "suffix": "x", "max_tokens": 4},
            cast_to=object,
        )


def test_gbnf_grammar(client: openai.OpenAI, model_id: str) -> None:
    grammar = 'root ::= answer "." \nanswer ::= "yes" | "no" | "maybe"\n'
    for seed in range(3):
        r = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Will it rain?"}],
            temperature=1.0,
            seed=seed,
            max_tokens=8,
            extra_body={"grammar": grammar},
        )
        assert r.choices[0].message.content in ("yes.", "no.", "maybe.")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_id,
            messages=ASK,
            max_tokens=4,
            extra_body={"grammar": "root ::= missing"},
        )
