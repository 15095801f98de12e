"""Several models in one `souverain serve`: SmolLM2 (the default, loaded at start) and Gemma 3
270M (loaded on first use, under an alias), with a memory budget that holds only one of them,
so each request for the other unloads the least recently used. Driven through the official
`openai` and `ollama` clients and llama.cpp's router routes (`/models/load`, `/models/unload`).

Gemma's greedy answer is checked against llama.cpp's greedy tokens (the model crate's golden
file): the model loaded on demand is the real model, answering as llama.cpp does.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import ollama
import openai
import pytest
from conftest import (
    GEMMA_MODEL,
    Server,
    _free_port,
    _health_ok,
    _read_log,
    _serve,
    _stop,
    server_binary,
)

GOLDEN = (
    Path(__file__).resolve().parents[2]
    / "crates/model/tests/golden/gemma3-270m-q4_k_m-llamacpp.json"
)
GEMMA_ID = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def two_models() -> Iterator[Server]:
    # SmolLM2 ~98 MB + ~47 MB of KV cache, Gemma ~253 MB + ~38 MB at a 1024-token context:
    # 300 MiB holds either, not both.
    args = [
        "--model",
        str(GEMMA_MODEL),
        "--model-alias",
        f"gemma={GEMMA_ID}",
        "--max-loaded-bytes",
        "300M",
        "--ctx-size",
        "1024",
    ]
    with _serve(args, None, chat_models=2) as s:
        yield s


def states(server: Server) -> dict[str, str]:
    listed = server.client.models.list().data
    return {m.id: (m.model_extra or {})["status"]["value"] for m in listed}


def post(server: Server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.root_url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_model_loads_on_first_use_and_the_other_makes_room(two_models: Server) -> None:
    client, default = two_models.client, two_models.model_id
    assert states(two_models) == {default: "loaded", GEMMA_ID: "unloaded"}

    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    case = next(c for c in golden["cases"] if c["name"] == "chat_capital_france")
    reply = client.chat.completions.create(
        model="gemma",
        messages=[{"role": "user", "content": case["user_message"]}],
        temperature=0,
        max_tokens=6,
    )
    assert reply.model == GEMMA_ID
    assert reply.usage is not None and reply.usage.prompt_tokens == len(case["tokens"])
    assert case["greedy_text"].startswith(reply.choices[0].message.content or "<none>")
    assert states(two_models) == {default: "unloaded", GEMMA_ID: "loaded"}

    reply = client.chat.completions.create(
        model=default,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=4,
    )
    assert reply.model == default and reply.choices[0].message.content
    assert states(two_models) == {default: "loaded", GEMMA_ID: "unloaded"}

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="not-served", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )


def test_router_routes_load_and_unload(two_models: Server) -> None:
    status, body = post(two_models, "/models/load", {"model": GEMMA_ID})
    assert (status, body["status"]) == (200, "loaded"), body
    assert states(two_models)[GEMMA_ID] == "loaded"
    status, body = post(two_models, "/models/unload", {"model": "gemma"})
    assert (status, body["was_loaded"]) == (200, True), body
    assert states(two_models)[GEMMA_ID] == "unloaded"
    status, body = post(two_models, "/models/load", {"model": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    with urllib.request.urlopen(two_models.root_url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert f'souverain_model_loaded{{model_name="{GEMMA_ID}"}} 0' in metrics


def test_ollama_lists_every_model_and_shows_the_loaded_ones(two_models: Server) -> None:
    client = ollama.Client(host=two_models.root_url)
    names = {m.model for m in client.list().models}
    assert names == {f"{two_models.model_id}:latest", f"{GEMMA_ID}:latest"}
    # Ollama's load request (a chat without messages) loads the model.
    client.chat(model=GEMMA_ID, messages=[])
    running = {m.model for m in client.ps().models}
    assert f"{GEMMA_ID}:latest" in running
    assert f"{two_models.model_id}:latest" not in running


def test_the_router_sends_each_model_where_it_is_served_and_loaded(two_models: Server) -> None:
    """`souverain route` in front of a one-model replica (SmolLM2) and the two-model one: it
    reads from each replica's metrics which models it serves and which are in memory, so
    Gemma always goes to the replica that serves it, and SmolLM2 to the one that has it
    loaded rather than to the one that would unload Gemma to load it again."""
    post(two_models, "/models/load", {"model": GEMMA_ID})
    with _serve([], None) as single, tempfile.TemporaryDirectory(prefix="souverain-route-") as tmp:
        config = Path(tmp) / "router.toml"
        lines = ["[scrape]", "interval_ms = 100"]
        for name, replica in (("single", single), ("pair", two_models)):
            lines += [
                "[[upstream]]",
                f'name = "{name}"',
                f'url = "{replica.root_url}"',
                'engine = "souverain"',
                'region = "eu-west-paris"',
            ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        port = _free_port()
        log_path = Path(tmp) / "route.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(server_binary()), "route", "--config", str(config), "--listen",
                 f"127.0.0.1:{port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            root = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not _health_ok(root):
                assert proc.poll() is None, _read_log(log_path)
                assert time.monotonic() < deadline, _read_log(log_path)
                time.sleep(0.2)
            time.sleep(1.0)  # a few scrapes: each replica's models are known
            client = openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0)
            assert {m.id for m in client.models.list().data} == {single.model_id, GEMMA_ID}
            for _ in range(6):
                reply = client.chat.completions.create(
                    model=GEMMA_ID,
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=2,
                )
                assert reply.model == GEMMA_ID
                reply = client.chat.completions.create(
                    model=single.model_id,
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=2,
                )
                assert reply.model == single.model_id
            # SmolLM2 never went to the pair's replica: Gemma stayed loaded there.
            assert states(two_models) == {two_models.model_id: "unloaded", GEMMA_ID: "loaded"}
        finally:
            _stop(proc)
