#!/usr/bin/env python3
"""Renders real chat templates with transformers (the renderer every Hugging Face model's
template is written for) and records what they render, as sha256 and length, for
crates/engine/tests/it/chat_templates.rs and the API's call round trips
(crates/api/src/output/template_calls.rs).

The templates come from llama-cpp-python's source package (`scripts/fetch-chat-templates`
puts them in ~/.cache/souverain/chat-templates); the golden file keeps each template's sha256
and the hashes of what it renders, never its text.

Messages are given in OpenAI's shape (tool-call arguments as JSON strings, `content: null` on
an assistant turn that only calls tools) and handed to the template the way Souverain and vLLM
hand them: arguments parsed into objects, a null content as the empty string. `strftime_now`
returns a fixed date (2026-01-02 00:00:00) so that templates that print today's date render
the same every day; the tests put today's date, as Souverain renders it, back to that one.

Usage (a Python with transformers >= 4.45 and jinja2):
    python3 scripts/golden/chat_templates.py [TEMPLATE_DIR] [OUT]
"""

import copy
import datetime
import hashlib
import json
import os
import sys

# This folder holds a mistral_common.py that would shadow the package transformers imports.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from transformers.utils import chat_template_utils as ctu  # noqa: E402

FIXED_NOW = datetime.datetime(2026, 1, 2, 0, 0, 0)

# The template files, and how the model writes tool calls (None: the template takes no tools
# the way Souverain passes them, so only conversations without tools are rendered).
TEMPLATES = {
    "Qwen-Qwen3-0.6B.jinja": {"calls": "hermes", "think": True},
    "Qwen-QwQ-32B.jinja": {"calls": "hermes", "think": True},
    "Qwen-Qwen2.5-7B-Instruct.jinja": {"calls": "hermes", "think": False},
    "deepseek-ai-DeepSeek-V3.1.jinja": {"calls": "deepseek", "think": True},
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": {"calls": "deepseek", "think": True},
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": {"calls": "mistral", "think": True},
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": {"calls": "mistral", "think": False},
    "unsloth-mistral-Devstral-Small-2507.jinja": {"calls": "mistral", "think": False},
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": {"calls": "mistral", "think": False},
    "meta-llama-Llama-3.1-8B-Instruct.jinja": {"calls": None, "think": False},
    "google-gemma-2-2b-it.jinja": {"calls": None, "think": False},
    "Qwen3-Coder.jinja": {"calls": "qwen-xml", "think": False},
    "Qwen3.5-4B.jinja": {"calls": "qwen-xml", "think": True},
}

# SmolLM2's special tokens: the engine tests render through it with the template replaced.
BOS = "<|im_start|>"
EOS = "<|im_end|>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Sets an alarm.",
        "parameters": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "loud": {"type": "boolean"},
                "label": {"type": "string"},
                "days": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["hour", "loud"],
        },
    },
}


def call(call_id, city):
    return {
        "id": call_id,
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": json.dumps({"location": city, "unit": "celsius"}),
        },
    }


def cases(spec):
    """(name, request) pairs; a request has messages, optional tools and kwargs, and
    `generation_prompt` (False for the turns whose last assistant message the tests parse
    back)."""
    out = [
        ("system_user", {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ]}),
        ("multi_turn", {"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ]}),
    ]
    if spec["think"]:
        out.append(("reasoning_history", {"messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
            {"role": "user", "content": "And 3+3?"},
        ]}))
        out.append(("thinking_off", {"kwargs": {"enable_thinking": False}, "messages": [
            {"role": "user", "content": "Hi"},
        ]}))
        out.append(("thinking_on", {"kwargs": {"enable_thinking": True, "thinking": True},
                                    "messages": [{"role": "user", "content": "Hi"}]}))
    if spec["calls"]:
        out.append(("tools_first_turn", {"tools": [WEATHER], "messages": [
            {"role": "system", "content": "You help with the weather."},
            {"role": "user", "content": "Weather in Paris and Lyon?"},
        ]}))
        out.append(("tool_results", {"tools": [WEATHER], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("abcDEF123", "Paris")]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"temperature\": 18}"},
        ]}))
        out.append(("call_turn", {"tools": [WEATHER], "generation_prompt": False, "messages": [
            {"role": "user", "content": "Weather in Paris and Lyon?"},
            {"role": "assistant", "content": None, "tool_calls": [
                call("abcDEF123", "Paris"), call("ghiJKL456", "Lyon")]},
        ]}))
        out.append(("typed_call_turn", {"tools": [WEATHER, ALARM], "generation_prompt": False,
                                         "messages": [
            {"role": "user", "content": "Wake me at 7 on weekdays, loudly."},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "mnoPQR789", "type": "function", "function": {
                    "name": "set_alarm",
                    "arguments": json.dumps({"hour": 7, "loud": True, "label": "wake up",
                                             "days": ["mon", "tue"]})}}]},
        ]}))
        if spec["think"]:
            out.append(("reasoned_call_turn", {"tools": [WEATHER], "generation_prompt": False,
                                               "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None,
                 "reasoning_content": "The user wants Paris.",
                 "tool_calls": [call("abcDEF123", "Paris")]},
            ]}))
    if spec["think"]:
        out.append(("answer_turn", {"generation_prompt": False, "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there.", "reasoning_content": "Greet back."},
        ]}))
    return out


def template_messages(messages):
    """As Souverain (and vLLM) hand messages to a template."""
    out = []
    for m in copy.deepcopy(messages):
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            if isinstance(args, str):
                try:
                    c["function"]["arguments"] = json.loads(args)
                except ValueError:
                    pass
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render(source, request):
    kwargs = dict(request.get("kwargs", {}))
    return ctu.render_jinja_template(
        conversations=[template_messages(request["messages"])],
        tools=request.get("tools"),
        chat_template=source,
        add_generation_prompt=request.get("generation_prompt", True),
        bos_token=BOS,
        eos_token=EOS,
        **kwargs,
    )[0][0]


def main():
    template_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.cache/souverain/chat-templates")
    out_path = sys.argv[2] if len(sys.argv) > 2 else "crates/engine/tests/golden/chat_templates.json"

    class FixedDateTime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    # transformers' strftime_now reads datetime.now().
    ctu.datetime = FixedDateTime
    templates = {}
    for name, spec in TEMPLATES.items():
        source = open(os.path.join(template_dir, name), encoding="utf-8").read()
        entry = {
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
            "calls": spec["calls"],
            "think": spec["think"],
            "cases": [],
        }
        for case_name, request in cases(spec):
            case = {"name": case_name, **request}
            try:
                text = render(source, request)
                case["rendered_sha256"] = hashlib.sha256(text.encode()).hexdigest()
                case["rendered_len"] = len(text.encode())
            except Exception as e:  # the template refuses the conversation
                case["raises"] = type(e).__name__
            entry["cases"].append(case)
        templates[name] = entry
    golden = {
        "source": "llama-cpp-python 0.3.36 source package, vendor/llama.cpp/models/templates "
                  "(scripts/fetch-chat-templates)",
        "renderer": "transformers "
                    + __import__("transformers").__version__
                    + " render_jinja_template, jinja2 " + __import__("jinja2").__version__,
        "bos_token": BOS,
        "eos_token": EOS,
        "fixed_date": FIXED_NOW.isoformat(),
        "templates": templates,
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    total = sum(len(t["cases"]) for t in templates.values())
    raised = sum(1 for t in templates.values() for c in t["cases"] if "raises" in c)
    print(f"wrote {out_path}: {len(templates)} templates, {total} cases ({raised} refused)")


if __name__ == "__main__":
    main()
