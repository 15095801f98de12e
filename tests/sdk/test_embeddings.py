"""`POST /v1/embeddings` with the official `openai` SDK, against sentence-transformers' vectors.

The server serves all-MiniLM-L6-v2 beside the chat model when SOUVERAIN_EMBEDDING_MODEL names
its directory (scripts/test sets it; scripts/fetch-embedding-model installs it). The expected
vectors are the golden file of scripts/golden/sentence_transformers.py.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from conftest import DEFAULT_MODEL, server_binary

if TYPE_CHECKING:
    from conftest import Server

GOLDEN = (
    Path(__file__).resolve().parents[2] / "crates/engine/tests/golden/minilm-embeddings.json"
)
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def embedding_model(server: Server) -> str:
    if server.embedding_model_id is None:
        pytest.skip("no embedding model served (set SOUVERAIN_EMBEDDING_MODEL)")
    return server.embedding_model_id


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_models_lists_the_embedding_model(server: Server, embedding_model: str) -> None:
    ids = [m.id for m in server.client.models.list().data]
    assert ids == [server.model_id, embedding_model]


def as_floats(embedding: list[float] | str) -> list[float]:
    """A vector as the SDK hands it back: floats, or the base64 text when asked for."""
    if isinstance(embedding, str):
        blob = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(blob) // 4}f", blob))
    return embedding


# None: the SDK's default, which asks for base64 on the wire and decodes it itself; "float":
# floats on the wire; "base64": the SDK hands back the base64 text, decoded here.
@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_vectors_match_sentence_transformers(
    client: openai.OpenAI, embedding_model: str, golden: dict, encoding_format: str | None
) -> None:
    cases = golden["cases"]
    texts = [c["text"] for c in cases]
    kw = {} if encoding_format is None else {"encoding_format": encoding_format}
    resp = client.embeddings.create(model=embedding_model, input=texts, **kw)
    vectors = [as_floats(d.embedding) for d in resp.data]
    assert resp.object == "list"
    assert resp.model == embedding_model
    assert [d.index for d in resp.data] == list(range(len(texts)))
    assert resp.usage.prompt_tokens == sum(len(c["token_ids"]) for c in cases)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens
    worst = min(cosine(v, c["embedding"]) for v, c in zip(vectors, cases, strict=True))
    print(f"minimum cosine over {len(cases)} inputs ({encoding_format}): {worst:.12f}")
    for v, c in zip(vectors, cases, strict=True):
        assert len(v) == golden["dimensions"]
        assert cosine(v, c["embedding"]) >= MIN_COSINE, c["text"]


def test_base64_on_the_wire_is_little_endian_f32(
    server: Server, embedding_model: str, golden: dict
) -> None:
    texts = [c["text"] for c in golden["cases"][:3]]
    raw = server.client.embeddings.with_raw_response.create(
        model=embedding_model, input=texts, encoding_format="base64"
    )
    body = json.loads(raw.http_response.text)
    floats = server.client.embeddings.create(
        model=embedding_model, input=texts, encoding_format="float"
    )
    for item, want in zip(body["data"], floats.data, strict=True):
        decoded = as_floats(item["embedding"])
        # JSON floats are the shortest text of each f32: rounded back to f32 they are equal.
        as_f32 = list(struct.unpack(f"<{len(want.embedding)}f",
                                    struct.pack(f"<{len(want.embedding)}f", *want.embedding)))
        assert decoded == as_f32


def test_single_string_and_token_ids(
    client: openai.OpenAI, embedding_model: str, golden: dict
) -> None:
    case = golden["cases"][1]
    by_text = client.embeddings.create(model=embedding_model, input=case["text"])
    by_ids = client.embeddings.create(model=embedding_model, input=case["token_ids"])
    assert len(by_text.data) == len(by_ids.data) == 1
    assert by_text.data[0].embedding == by_ids.data[0].embedding
    assert cosine(by_text.data[0].embedding, case["embedding"]) >= MIN_COSINE


def test_too_long_and_empty_inputs_are_400(client: openai.OpenAI, embedding_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=embedding_model, input=["fine", "word " * 300])
    assert err.value.status_code == 400
    assert "input[1]" in str(err.value.body) or "Input 1" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=embedding_model, input="")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=embedding_model, input="a", dimensions=16)


def test_an_embedding_model_named_like_the_chat_model_is_refused(server: Server) -> None:
    """One name, one model: a server asked to serve the embedding model under the chat model's
    id refuses to start, saying so."""
    directory = os.environ.get("SOUVERAIN_EMBEDDING_MODEL")
    if not directory:
        pytest.skip("no embedding model (set SOUVERAIN_EMBEDDING_MODEL)")
    run = subprocess.run(
        [str(server_binary()), "serve", "--model", str(DEFAULT_MODEL), "--port", "0",
         "--embedding-model", directory, "--embedding-model-id", server.model_id],
        capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "is a chat model's too" in run.stderr, run.stderr
