"""Several models in one `souverain serve`: SmolLM2 (the default, loaded at start) and Gemma 3
270M (loaded on first use, under an alias), with a memory budget that holds only one of them,
so each request for the other unloads the least recently used. Driven through the official
`openai` and `ollama` clients and llama.cpp's router routes (`/models/load`, `/models/unload`).

Gemma's greedy answer is checked against llama.cpp's greedy tokens (the model crate's golden
file): the model loaded on demand is the real model, answering as llama.cpp does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import ollama
import openai
import pytest
from conftest import GEMMA_MODEL, Server, _serve

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
