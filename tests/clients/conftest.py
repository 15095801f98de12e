"""The application client libraries' suite: LangChain, LiteLLM, instructor, the `llm` CLI,
pydantic-ai, LlamaIndex and the OpenAI Agents SDK, each used as applications use it against a
real `souverain serve` (the default chat model and the embedding model beside it).

These libraries pin `openai` versions the official-SDK suite (`tests/sdk`) cannot share, so
they live in a venv of their own (`scripts/test` makes `.venv-clients` from
`tests/clients/requirements.txt`). Nothing here reaches the internet: LiteLLM reads its
bundled cost map, tracing of the Agents SDK is off, token counting that would download
tiktoken's files is not used.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("SOUVERAIN_BIN", str(REPO_ROOT / "target/release/souverain")))
MODELS = Path(os.environ.get("SOUVERAIN_MODELS", Path.home() / ".cache/souverain/models"))
CHAT_MODEL = Path(os.environ.get("SOUVERAIN_MODEL", str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")))
EMBEDDING_MODEL = Path(
    os.environ.get("SOUVERAIN_EMBEDDING_MODEL", str(MODELS / "all-MiniLM-L6-v2"))
).expanduser()

# No client library may phone home from a test.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")


@dataclasses.dataclass(frozen=True)
class Server:
    """A running server: its URLs and model ids."""

    root_url: str  # http://127.0.0.1:PORT
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # the chat model's id
    embedding_model: str  # the embedding model's id
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    if not BINARY.is_file():
        pytest.fail(f"server binary {BINARY} not found (set SOUVERAIN_BIN or build it)")
    for path in (CHAT_MODEL, EMBEDDING_MODEL):
        if not path.exists():
            pytest.fail(f"model {path} not found (scripts/fetch-model, scripts/fetch-embedding-model)")
    port = _free_port()
    root = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="souverain-clients-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BINARY), "serve", "--model", str(CHAT_MODEL), "--embedding-model",
                 str(EMBEDDING_MODEL), "--host", "127.0.0.1", "--port", str(port),
                 "--threads", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{root}/health", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"server did not start:\n{log.read_text(errors='replace')}")
                    time.sleep(0.2)
            yield Server(
                root_url=root,
                base_url=f"{root}/v1",
                model=CHAT_MODEL.stem,
                embedding_model=EMBEDDING_MODEL.name,
                log=log,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
