"""Energy per request as clients see it, through the official SDKs: the `energy_joules` and
`energy_source` extension fields of `usage` (OpenAI chat and completions, whole and streamed;
Anthropic's messages, whole and streamed; the Responses API; Ollama's closing object, whole and
streamed) and the `x-souverain-energy-*` headers of every API's whole answer, which must agree
with the usage they come with; under `--auth`, the usage records of
requests that ended every way (answered, or a stream its client closed) carry the energy the
engine charged them, summing to what `/metrics` says requests used; and measured energy, from
NVML's counters, with a simulated NVML library (this machine has no GPU): labelled measured,
summing to the counters' growth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from conftest import (
    DEFAULT_MODEL,
    GEMMA_MODEL,
    REPO_ROOT,
    Server,
    _serve,
    admin,
    server_binary,
)

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


def test_every_apis_whole_answer_has_the_energy_headers_of_its_usage(
    server: Server, client: openai.OpenAI, model_id: str
) -> None:
    def agree(headers, joules: float, source: str) -> None:
        assert headers["x-souverain-energy-source"] == source
        assert abs(float(headers["x-souverain-energy-joules"]) - joules) < 1e-5

    with anthropic.Anthropic(base_url=server.root_url, api_key="unused", max_retries=0) as c:
        raw = c.messages.with_raw_response.create(model=model_id, max_tokens=8, messages=CHAT,
                                                  extra_body={"temperature": 0})
        agree(raw.headers, *energy_of(raw.parse().usage))
    raw = client.responses.with_raw_response.create(model=model_id, input="Name three colours.",
                                                    max_output_tokens=16, temperature=0)
    agree(raw.headers, *energy_of(raw.parse().usage))
    # Ollama's API: its client reads the answer (and ignores the extension); the closing
    # object carries the energy beside Ollama's counters, whole or streamed.
    ol = ollama.Client(host=server.root_url, timeout=120)
    assert ol.chat(model=model_id, messages=CHAT, options={"temperature": 0, "num_predict": 8}).done
    for stream in (False, True):
        body = json.dumps({"model": model_id, "messages": CHAT, "stream": stream,
                           "options": {"temperature": 0, "num_predict": 8}}).encode()
        req = urllib.request.Request(f"{server.root_url}/api/chat", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            headers, lines = r.headers, [json.loads(line) for line in r.read().splitlines()]
        last = lines[-1]
        assert last["done"] and last["eval_count"] > 0, last
        joules, source = last["energy_joules"], last["energy_source"]
        assert isinstance(joules, float) and joules > 0 and source in SOURCES, last
        if not stream:
            agree(headers, joules, source)


def test_the_chat_and_embedding_models_share_one_meter() -> None:
    """Served together, the chat model and the embedding model read one meter: each answer's
    energy is in its model's requests counter, idle is the process's once, and everything the
    meter gave is at most the machine's power over the server's life (a model at 10 W with
    nothing for busy threads: 10 W times the uptime; a meter per model would count it once
    per model)."""
    embedding_model = os.environ.get("SOUVERAIN_EMBEDDING_MODEL")
    if not embedding_model:
        pytest.skip("no embedding model (set SOUVERAIN_EMBEDDING_MODEL)")
    started = time.monotonic()
    args = ["--energy-source", "model", "--energy-idle-watts", "10",
            "--energy-active-watts", "0"]
    with _serve(args, embedding_model) as server:
        c = server.client
        chat = [energy_of(c.chat.completions.create(
            model=server.model_id, messages=CHAT, max_tokens=16, temperature=0).usage)[0]
            for _ in range(3)]
        raw = c.embeddings.with_raw_response.create(
            model=server.embedding_model_id, input=["a sentence", "another sentence"])
        embedded = raw.parse()
        joules, source = energy_of(embedded.usage)
        assert source == "modelled"
        assert abs(float(raw.headers["x-souverain-energy-joules"]) - joules) < 1e-5
        embeds = [joules] + [energy_of(c.embeddings.create(
            model=server.embedding_model_id, input="more text").usage)[0] for _ in range(2)]
        # Idle goes on while the server waits: let the engines read the meter again.
        time.sleep(1.5)
        totals = energy_totals(server.root_url)
        uptime = time.monotonic() - started
    assert set(totals) == {(server.model_id, "requests"), (server.embedding_model_id, "requests"),
                           (None, "idle")}, totals
    assert abs(totals[(server.model_id, "requests")] - sum(chat)) < 1e-5 * len(chat)
    assert abs(totals[(server.embedding_model_id, "requests")] - sum(embeds)) < 1e-5 * len(embeds)
    machine = sum(totals.values())
    assert machine <= 10.0 * uptime, (totals, uptime)
    # The meter was read through the run: most of the server's life is in it.
    assert machine >= 10.0 * 0.5 * uptime - 10.0, (totals, uptime)


def energy_totals(root_url: str) -> dict[tuple[str | None, str], float]:
    """`souverain_energy_joules_total` by (model, kind), in joules; the model is None for the
    process's idle."""
    with urllib.request.urlopen(f"{root_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str | None, str], float] = {}
    for labels, value in re.findall(r'^souverain_energy_joules_total\{([^}]*)\} (\S+)$', text,
                                    re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (fields.get("model_name"), fields["kind"])
        assert key not in out, text
        out[key] = float(value)
    return out


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


SIMULATED_NVML = REPO_ROOT / "crates" / "engine" / "testdata" / "simulated_nvml.c"


def simulated_nvml(tmp_path: Path, log: Path, gpus: int) -> dict[str, str]:
    """Builds the simulated NVML library (NVML's functions over total-energy counters that grow
    as `gpus` GPUs drawing 300, 600, ... W would; each read logged to `log`) as
    libnvidia-ml.so.1 in a folder of its own; returns the environment that makes a server
    find it."""
    lib_dir = tmp_path / "nvml"
    lib_dir.mkdir(exist_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib_dir / "libnvidia-ml.so.1"),
                    str(SIMULATED_NVML)], check=True)
    paths = [str(lib_dir), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p),
            "SIMULATED_NVML_GPUS": str(gpus), "SIMULATED_NVML_WATTS": "300",
            "SIMULATED_NVML_LOG": str(log)}


def energy_metrics(root_url: str) -> dict[str, tuple[str, str, int]]:
    """`souverain_energy_joules_total` by kind: (source, meter, microjoules)."""
    with urllib.request.urlopen(f"{root_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^souverain_energy_joules_total\{[^}]*source="([^"]+)",meter="([^"]+)",'
                       r'kind="([^"]+)"\} (\S+)$', text, re.M)
    assert len(found) == 2, text
    return {kind: (source, meter, round(float(v) * 1e6)) for source, meter, kind, v in found}


def counter_totals(log: Path) -> set[int]:
    """From the simulated library's log of reads ("<gpu> <mJ>"), the counters' growth since
    each GPU's first read, in microjoules, after every read."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    totals = set()
    for line in log.read_text().split("\n"):
        if not line:
            continue
        gpu, mj = map(int, line.split())
        first.setdefault(gpu, mj)
        last[gpu] = mj
        totals.add(sum(last[g] - first[g] for g in last) * 1000)
    return totals


def test_energy_is_measured_from_a_simulated_nvml_library(tmp_path: Path) -> None:
    """`--energy-source nvml` over a simulated NVML (two GPUs; no GPU here): answers, headers
    and `/metrics` say `measured` and name the meter, and the requests' and idle joules sum
    exactly to the counters' growth since the engine's first read."""
    log = tmp_path / "nvml.log"
    env = simulated_nvml(tmp_path, log, gpus=2)
    with _serve(["--energy-source", "nvml"], None, env=env) as server:
        c, model = server.client, server.model_id
        t0 = time.monotonic()
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=CHAT, max_tokens=8, temperature=0)
        wall = time.monotonic() - t0
        joules, source = energy_of(raw.parse().usage)
        assert source == "measured"
        assert raw.headers["x-souverain-energy-source"] == "measured"
        # 300 + 600 W over the answer's steps, which took less than its wall time.
        assert joules < 900 * wall, (joules, wall)
        usage = None
        for chunk in c.chat.completions.create(
            model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ):
            usage = chunk.usage or usage
        assert usage is not None
        streamed, source = energy_of(usage)
        assert source == "measured"
        # Nothing runs now, so the engine only adds idle joules: requests and idle are
        # read consistently.
        m = energy_metrics(server.root_url)
        assert {k: v[:2] for k, v in m.items()} == {
            "requests": ("measured", "nvml"), "idle": ("measured", "nvml")}
        # The requests' joules are the two answers' (nothing else ran), each rounded to the
        # microjoule in `usage`.
        assert abs(m["requests"][2] - round((joules + streamed) * 1e6)) <= 2, m
        # Requests plus idle is what the counters grew by between two of the engine's reads.
        assert m["requests"][2] + m["idle"][2] in counter_totals(log), m
    # `auto` does not take NVML (this engine computes on the CPU): modelled here, no RAPL.
    if not Path("/sys/class/powercap/intel-rapl:0").exists():
        with _serve([], None, env=env) as server:
            r = server.client.chat.completions.create(
                model=server.model_id, messages=CHAT, max_tokens=2, temperature=0)
            assert energy_of(r.usage)[1] == "modelled"
            assert energy_metrics(server.root_url)["requests"][:2] == ("modelled", "model")


def test_two_chat_models_and_the_embedding_model_share_the_measured_meter(
    tmp_path: Path,
) -> None:
    """Two chat models and the embedding model, each computing at once, over one simulated
    NVML: every model's requests plus the process's idle sum exactly to the counters' growth
    (a meter per model would count each joule once per model)."""
    embedding_model = os.environ.get("SOUVERAIN_EMBEDDING_MODEL")
    if not embedding_model or not GEMMA_MODEL.is_file():
        pytest.skip("needs the embedding model and the Gemma 3 test model")
    log = tmp_path / "nvml.log"
    env = simulated_nvml(tmp_path, log, gpus=2)
    args = ["--energy-source", "nvml", "--model", str(GEMMA_MODEL), "--ctx-size", "1024"]
    with _serve(args, embedding_model, env=env, chat_models=2) as server:
        c = server.client
        chat_ids = [m.id for m in c.models.list().data if m.id != server.embedding_model_id]
        assert len(chat_ids) == 2, chat_ids
        answers: dict[str, float] = {}

        def chat(model: str) -> None:
            r = c.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                          temperature=0)
            answers[model] = energy_of(r.usage)[0]

        def embed() -> None:
            r = c.embeddings.create(model=server.embedding_model_id,
                                    input=["a sentence to embed"] * 8)
            answers[server.embedding_model_id] = energy_of(r.usage)[0]

        threads = [threading.Thread(target=f, args=a) for f, a in
                   [(chat, (chat_ids[0],)), (chat, (chat_ids[1],)), (embed, ())]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(answers) == 3, answers
        totals = energy_totals(server.root_url)
    assert set(totals) == {(m, "requests") for m in answers} | {(None, "idle")}, totals
    for model, joules in answers.items():
        # Each model's counter is its one answer's joules (rounded to the microjoule).
        assert abs(totals[(model, "requests")] - joules) <= 2e-6, (model, totals)
    everything = round(sum(totals.values()) * 1e6)
    totals_read = counter_totals(log)
    assert min(abs(everything - t) for t in totals_read) <= 4, (everything, totals)


def test_nvml_without_a_gpu_refuses_to_start(tmp_path: Path) -> None:
    """NVML that finds no GPU (the simulated library with none): `--energy-source nvml` is an
    error that says so, not a server labelling modelled joules measured."""
    env = simulated_nvml(tmp_path, tmp_path / "nvml.log", gpus=0)
    model = Path(os.environ.get("SOUVERAIN_MODEL", str(DEFAULT_MODEL))).expanduser()
    r = subprocess.run([str(server_binary()), "serve", "--model", str(model), "--port", "0",
                        "--energy-source", "nvml"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no NVIDIA GPU" in r.stdout + r.stderr, r
