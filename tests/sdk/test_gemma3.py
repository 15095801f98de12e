"""Gemma 3 270M served by `souverain serve`, chatted with through the official `openai` SDK:
its SentencePiece vocabulary, Gemma's turn format (the file carries no template; a system
prompt folds into the first user turn), greedy answers as llama.cpp's.

This small Q4_K_M file answers poorly (llama.cpp's own greedy answer to the question below
repeats it), so the check is agreement with llama.cpp's greedy tokens from the model crate's
golden file, not the answer's content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Server

GOLDEN = (
    Path(__file__).resolve().parents[2]
    / "crates/model/tests/golden/gemma3-270m-q4_k_m-llamacpp.json"
)


def test_gemma3_greedy_chat_is_llama_cpps_and_system_prompt_folds(gemma_server: Server) -> None:
    client, model = gemma_server.client, gemma_server.model_id
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    case = next(c for c in golden["cases"] if c["name"] == "chat_capital_france")
    question = [{"role": "user", "content": case["user_message"]}]
    reply = client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=6
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(case["tokens"])
    assert case["greedy_text"].startswith(choice.message.content or "<none>"), (
        choice.message.content,
        case["greedy_text"],
    )
    with_system = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, *question],
        temperature=0,
        max_tokens=1,
    )
    # "Be brief.\n\n" joins the user turn: a few more prompt tokens, no turn of its own.
    assert with_system.usage is not None
    extra = with_system.usage.prompt_tokens - reply.usage.prompt_tokens
    assert 3 <= extra <= 6, extra


def test_gemma3_stream_matches_whole_answer(gemma_server: Server) -> None:
    client, model = gemma_server.client, gemma_server.model_id
    messages = [{"role": "user", "content": "Name a colour of the sky."}]
    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12
    )
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=12, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content
    assert "<start_of_turn>" not in streamed and "<end_of_turn>" not in streamed
