"""logprobs, top_logprobs, logit_bias and Mistral's aliases through the official SDK."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import openai

if TYPE_CHECKING:
    from conftest import Server

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_chat_logprobs_follow_the_greedy_choice(client: openai.OpenAI, model_id: str) -> None:
    r = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=5,
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens or choice.finish_reason == "stop"
    assert "".join(t.token for t in content).startswith(choice.message.content[:5])
    for t in content:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 5
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(t.logprob, lps[0], abs_tol=1e-5)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or t.bytes
        # The alternatives are a probability distribution's top: their mass is at most 1.
        assert sum(math.exp(x) for x in lps) <= 1.0 + 1e-4


def test_streamed_logprobs_equal_non_streamed(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(model=model_id, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in whole
    ]


def test_completion_logprobs(client: openai.OpenAI, model_id: str) -> None:
    r = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert all(len(alts) <= 3 for alts in lp.top_logprobs)
    # llama.cpp's greedy continuation of this prompt starts with " Paris".
    assert lp.tokens[0] == " Paris"


def test_logit_bias_bans_and_forces(client: openai.OpenAI, model_id: str) -> None:
    base = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=0
    )
    first = base.choices[0].text
    assert first == " Paris"
    tok = client.post("/../tokenize", body={"prompt": first}, cast_to=object)["tokens"]
    assert len(tok) == 1
    banned = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=1, temperature=0,
        logit_bias={str(tok[0]): -100},
    )
    assert banned.choices[0].text != first
    forced = client.completions.create(
        model=model_id, prompt="Hello", max_tokens=3, temperature=0,
        logit_bias={str(tok[0]): 100},
    )
    assert forced.choices[0].text == first * 3


def test_mistral_random_seed_is_seed(client: openai.OpenAI, model_id: str) -> None:
    kw = dict(model=model_id, messages=MESSAGES, max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(extra_body={"random_seed": 7}, **kw).choices[0].message.content
    assert a == b


GUARDRAIL = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity."
)


def test_safe_prompt_puts_mistral_guardrail_first(client: openai.OpenAI, model_id: str) -> None:
    greedy = dict(model=model_id, max_tokens=6, temperature=0)
    safe = client.chat.completions.create(messages=MESSAGES, extra_body={"safe_prompt": True}, **greedy)
    explicit = client.chat.completions.create(
        messages=[{"role": "system", "content": GUARDRAIL}, *MESSAGES], **greedy
    )
    plain = client.chat.completions.create(messages=MESSAGES, **greedy)
    assert safe.usage.prompt_tokens == explicit.usage.prompt_tokens != plain.usage.prompt_tokens
    assert safe.choices[0].message.content == explicit.choices[0].message.content
