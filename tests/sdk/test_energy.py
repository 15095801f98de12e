"""Energy per request as clients see it, through the official SDKs: the `energy_joules` and
`energy_source` extension fields of `usage` (OpenAI chat and completions, whole and streamed;
Anthropic's messages, whole and streamed) and the `x-souverain-energy-*` headers of a whole
answer, which must agree with the usage they come with."""

from __future__ import annotations

import anthropic
import openai

from conftest import Server

CHAT = [{"role": "user", "content": "Name three colours."}]
SOURCES = {"measured", "modelled"}


def energy_of(usage) -> tuple[float, str]:
    extra = usage.model_extra or {}
    joules, source = extra.get("energy_joules"), extra.get("energy_source")
    assert isinstance(joules, float) and joules > 0, usage
    assert source in SOURCES, usage
    return joules, source


def test_chat_usage_and_headers_carry_the_same_energy(
    client: openai.OpenAI, model_id: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model_id, messages=CHAT, max_tokens=8, temperature=0
    )
    r = raw.parse()
    joules, source = energy_of(r.usage)
    assert raw.headers["x-souverain-energy-source"] == source
    assert abs(float(raw.headers["x-souverain-energy-joules"]) - joules) < 1e-5


def test_streamed_usage_carries_energy(client: openai.OpenAI, model_id: str) -> None:
    usage = None
    for chunk in client.completions.create(
        model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
    assert usage is not None
    energy_of(usage)


def test_anthropic_usage_carries_energy(server: Server, model_id: str) -> None:
    with anthropic.Anthropic(base_url=server.root_url, api_key="unused", max_retries=0) as c:
        msg = c.messages.create(model=model_id, max_tokens=8, messages=CHAT,
                                extra_body={"temperature": 0})
        energy_of(msg.usage)
        # The stream's last usage (`message_delta`) carries it.
        deltas = [e for e in c.messages.create(model=model_id, max_tokens=8, messages=CHAT,
                                               extra_body={"temperature": 0}, stream=True)
                  if e.type == "message_delta"]
        assert len(deltas) == 1
        assert deltas[0].usage.output_tokens == msg.usage.output_tokens
        energy_of(deltas[0].usage)
