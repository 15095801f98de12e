"""The default model served with real chat templates, through the official OpenAI SDK.

The templates are the ones Qwen3, Qwen3-Coder, DeepSeek-V3.1 and DeepSeek-R1 ship (copies from
llama-cpp-python's source package, fetched by scripts/fetch-chat-templates); the server reads
the call syntax and reasoning markers off each (`--chat-template-file`). The small model does
not know these formats, so the calls are forced (`tool_choice`, constrained to the syntax and
the function's schema) and the reasoning by a grammar: what is tested is that the server
writes, constrains and parses each family's own syntax, end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import openai
import pytest

from conftest import Server, _serve
from test_tools_reasoning import ASK, TIME, WEATHER, check_call

TEMPLATES = Path(
    os.environ.get("SOUVERAIN_CHAT_TEMPLATES", "~/.cache/souverain/chat-templates")
).expanduser()
FILES = {
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "deepseek-v3.1": "deepseek-ai-DeepSeek-V3.1.jinja",
    "deepseek-r1": "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "qwen3-coder": "Qwen3-Coder.jinja",
}


# What each family's calls look like.
MARKERS = {
    "qwen3": '<tool_call>\n{"name":"get_weather","arguments":{',
    "deepseek-v3.1": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{",
    "deepseek-r1": "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{",
    "qwen3-coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\n",
}


@pytest.fixture(scope="module", params=list(FILES))
def templated(request) -> Iterator[tuple[str, Server]]:
    path = TEMPLATES / FILES[request.param]
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/fetch-chat-templates")
    with _serve(["--chat-template-file", str(path)], None) as s:
        yield request.param, s


def test_forced_call_in_the_family_syntax(templated: tuple[str, Server]) -> None:
    family, server = templated
    kwargs = dict(
        model=server.model_id,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.7,
        seed=5,
        max_tokens=120,
    )
    whole = client_call = server.client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", (family, choice)
    assert choice.message.content is None, family
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = check_call(call)
    # Streamed: the same call, rebuilt from the deltas as OpenAI's clients do.
    name, arguments, finish = "", "", None
    for chunk in server.client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            assert not c.delta.content, (family, c.delta)
            for d in c.delta.tool_calls or []:
                name += (d.function and d.function.name) or ""
                arguments += (d.function and d.function.arguments) or ""
            finish = c.finish_reason or finish
    assert (name, finish) == ("get_weather", "tool_calls"), family
    assert json.loads(arguments) == args, family
    assert client_call.usage.completion_tokens > 5
    # What the model wrote is the family's syntax (the generated tokens, through logprobs).
    written = server.client.chat.completions.create(
        logprobs=True, **{**kwargs, "temperature": 0}
    )
    # The forced string ends where the model ends it (not padded to its maxLength of 40).
    (greedy_call,) = written.choices[0].message.tool_calls
    assert len(check_call(greedy_call)["city"]) < 40, (family, greedy_call)
    tokens = written.choices[0].logprobs.content or []
    # Token by token a marker's characters may be split: join the bytes.
    text = b"".join(bytes(t.bytes or []) for t in tokens).decode()
    assert MARKERS[family] in text, (family, text)


def test_tool_results_go_back_through_the_template(templated: tuple[str, Server]) -> None:
    family, server = templated
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abcDEF123",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 21}'},
    ]
    r = server.client.chat.completions.create(
        model=server.model_id, messages=history, tools=[WEATHER], temperature=0, max_tokens=16
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), family
    short = server.client.chat.completions.create(
        model=server.model_id, messages=ASK, tools=[WEATHER], max_tokens=1
    )
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 15, family


# A reasoning block and an answer, as a thinking model writes them after Qwen3's prompt.
THOUGHT = (
    '%llguidance {}\nstart: "<think>\\n" /[a-z]{1,9}( [a-z]{1,9}){2,6}/ "\\n</think>\\n\\n" '
    '/[A-Z][a-z]{1,9}( [a-z]{1,9}){1,5}/ "."'
)


def test_qwen3_reasoning_comes_back_apart(templated: tuple[str, Server]) -> None:
    family, server = templated
    if family != "qwen3":
        pytest.skip("Qwen3's template leaves the block for the model to open")
    kwargs = dict(
        model=server.model_id,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        temperature=0.8,
        seed=7,
        max_tokens=60,
        extra_body={"grammar": THOUGHT},
    )
    whole = server.client.chat.completions.create(**kwargs)
    msg = whole.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning and "think>" not in reasoning
    assert msg.content and msg.content[0].isupper() and msg.content.endswith(".")
    assert "think>" not in msg.content
    streamed_reasoning, streamed_content = "", ""
    for chunk in server.client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed_reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            streamed_content += c.delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, msg.content)
    # `enable_thinking: false` makes the template write an empty block into the prompt.
    off = server.client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    on = server.client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=1,
    )
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
