"""Energy per request as clients see it, through the official SDKs: the `energy_joules` and
`energy_source` extension fields of `usage` (OpenAI chat and completions, whole and streamed;
Anthropic's messages, whole and streamed) and the `x-souverain-energy-*` headers of a whole
answer, which must agree with the usage they come with; and under `--auth`, the usage records of
requests that ended every way (answered, or a stream its client closed) carry the energy the
engine charged them, summing to what `/metrics` says requests used."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import anthropic
import openai

from conftest import Server, _serve, admin

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


def requests_joules(root_url: str) -> float:
    """`souverain_energy_joules_total{kind="requests"}` of the (one) model."""
    with urllib.request.urlopen(f"{root_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^souverain_energy_joules_total\{[^}]*kind="requests"[^}]*\} (\S+)$', text,
                       re.M)
    assert len(found) == 1, text
    return float(found[0])


def test_a_cancelled_stream_is_charged_its_energy(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    org = admin(data_dir, "org", "create", "acme")["id"]
    project = admin(data_dir, "project", "create", org, "app")
    key = admin(data_dir, "key", "create", project["id"], "k")["key"]
    with _serve(["--auth", "--data-dir", str(data_dir)], None, api_key=key) as server:
        c, model = server.client, server.model_id
        c.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        # The client reads three chunks of a long answer and goes away.
        stream = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count from one to two hundred."}],
            max_tokens=400, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline, usage = time.time() + 30, []
        while time.time() < deadline:
            usage = admin(data_dir, "usage")
            if len(usage) == 2:
                break
            time.sleep(0.2)
        assert sorted(u["status"] for u in usage) == ["cancelled", "ok"], usage
        for u in usage:
            assert u["energy_uj"] and u["energy_uj"] > 0, u
            assert u["energy_source"] in SOURCES, u
        # Every joule the engine charged to requests is in a record, the cancelled one's
        # included (the server meters nothing else here).
        recorded = sum(u["energy_uj"] for u in usage) / 1e6
        charged = requests_joules(server.root_url)
        assert abs(recorded - charged) <= 0.01 * charged, (recorded, charged)
