"""The rest of `/v1/completions` through the official SDK: a prompt given as token ids, a batch
of prompts (OpenAI's list form, strings or token-id lists, each with its `n` choices), and vLLM's
`return_tokens_as_token_ids`."""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING

import openai
import pytest

if TYPE_CHECKING:
    from conftest import Server

TEXT = "The capital of France is"
# llama.cpp's ids for TEXT on SmolLM2 (crates/model/tests/golden, first case).
IDS = [504, 3575, 282, 4649, 314]


def detokenize(server: Server, ids: list[int]) -> str:
    request = urllib.request.Request(
        f"{server.root_url}/detokenize", data=json.dumps({"tokens": ids}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["prompt"]


def greedy(client: openai.OpenAI, model: str, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, **kw)


def test_token_ids_prompt_equals_its_text(client: openai.OpenAI, model_id: str) -> None:
    by_text = greedy(client, model_id, TEXT)
    by_ids = greedy(client, model_id, IDS)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(IDS) == by_text.usage.prompt_tokens
    # `echo` gives the ids' text back before the completion.
    echoed = greedy(client, model_id, IDS, echo=True)
    assert echoed.choices[0].text == TEXT + by_text.choices[0].text


def test_a_batch_answers_each_prompt_with_its_n_choices(
    client: openai.OpenAI, model_id: str
) -> None:
    prompts = [TEXT, "Once upon a time", IDS]
    singles = [greedy(client, model_id, p) for p in prompts]
    batch = greedy(client, model_id, prompts, n=2)
    assert [c.index for c in batch.choices] == list(range(6))
    for p, single in enumerate(singles):
        for i in range(2):
            # Choice p * n + i is prompt p's i-th (greedy: both equal the prompt alone).
            assert batch.choices[p * 2 + i].text == single.choices[0].text, (p, i)
    # Each prompt counted once; every choice's tokens counted.
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)


def test_a_streamed_batch_assembles_to_the_whole_answer(
    client: openai.OpenAI, model_id: str
) -> None:
    whole = greedy(client, model_id, ["Once upon a time", IDS, [504, 3575]])
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    stream = client.completions.create(
        model=model_id, prompt=["Once upon a time", IDS, [504, 3575]], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens


def test_return_tokens_as_token_ids_names_tokens_by_id(
    server: Server, client: openai.OpenAI, model_id: str
) -> None:
    plain = greedy(client, model_id, TEXT, logprobs=2)
    by_id = greedy(client, model_id, TEXT, logprobs=2,
                   extra_body={"return_tokens_as_token_ids": True})
    assert by_id.choices[0].text == plain.choices[0].text
    tokens = by_id.choices[0].logprobs.tokens
    assert tokens and all(t.startswith("token_id:") for t in tokens)
    assert by_id.choices[0].logprobs.text_offset == plain.choices[0].logprobs.text_offset
    # Each id names the token the plain answer shows as text.
    ids = [int(t.split(":", 1)[1]) for t in tokens]
    for i, text in zip(ids, plain.choices[0].logprobs.tokens):
        assert detokenize(server, [i]) == text
    chat = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = chat.choices[0].logprobs.content
    assert content and all(t.token.startswith("token_id:") for t in content)
    assert all(a.token.startswith("token_id:") for t in content for a in t.top_logprobs)


@pytest.mark.parametrize(
    "prompt",
    [
        [],  # nothing to complete
        [1, -2],  # not a token id
        [10**12],  # beyond 32 bits
        ["a", [1], []],  # an empty token list in a batch
        [1, "a"],  # ids and text mixed
    ],
)
def test_bad_prompts_are_400s_naming_prompt(
    client: openai.OpenAI, model_id: str, prompt
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model_id, prompt)
    assert e.value.body["param"] == "prompt", e.value.body


def test_an_id_outside_the_vocabulary_is_a_400(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model_id, [504, 49152])
    assert "49152" in e.value.message
    with pytest.raises(openai.BadRequestError):
        greedy(client, model_id, [TEXT, [4_000_000_000]])


def test_too_many_sequences_are_refused(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model_id, [TEXT] * 33, n=2)
    assert e.value.body["param"] == "n"
