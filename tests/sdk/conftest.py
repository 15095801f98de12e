"""Start one `souverain serve` for the whole session and hand tests an official OpenAI client.

Environment:
    SOUVERAIN_BIN    the server binary (default: <repo>/target/release/souverain)
    SOUVERAIN_MODEL  the GGUF model to serve
                     (default: ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf)
    SOUVERAIN_EMBEDDING_MODEL  when set, an embedding model directory served beside it
                     (`--embedding-model`; see scripts/fetch-embedding-model)

Run:
    python3 -m venv .venv-sdk && .venv-sdk/bin/pip install -r tests/sdk/requirements.txt
    cargo build -p souverain-cli --release
    .venv-sdk/bin/pytest tests/sdk
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "souverain"


def server_binary() -> Path:
    """The `souverain` binary under test (SOUVERAIN_BIN, else the release build)."""
    return Path(os.environ.get("SOUVERAIN_BIN", str(DEFAULT_BIN)))
DEFAULT_MODEL = Path("~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()

STARTUP_TIMEOUT_S = 120.0
HEALTH_POLL_S = 0.2
REQUEST_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Server:
    """A running server: its OpenAI client, URLs and the model id it serves."""

    client: openai.OpenAI
    base_url: str  # http://127.0.0.1:PORT/v1
    root_url: str  # http://127.0.0.1:PORT
    model_id: str
    # The embedding model's id when one is served (SOUVERAIN_EMBEDDING_MODEL), else None.
    embedding_model_id: str | None = None


def admin(data_dir: Path, *args: str):
    """Runs `souverain admin --data-dir DIR ARGS...` and returns its JSON (a list of entries
    for `audit list`, which prints one per line)."""
    out = subprocess.run(
        [str(server_binary()), "admin", "--data-dir", str(data_dir), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = out.stdout.strip()
    if args[:2] == ("audit", "list"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health_ok(root_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root_url}/health", timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _read_log(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-8000:]
    except OSError as exc:
        return f"<could not read server log: {exc}>"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _serve(
    extra_args: list[str],
    embedding_model: str | None,
    model: Path | None = None,
    api_key: str = "unused",
    chat_models: int = 1,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Starts `souverain serve` on the model (the default one unless `model` names another)
    with `extra_args`; stops it on exit. The client sends `api_key` (a real key for a server
    started with `--auth`). `chat_models` is how many chat models `/v1/models` must list
    (more than one when `extra_args` add models). `port` reuses a port (a restart). `env`
    adds to the server's environment."""
    binary = server_binary()
    if model is None:
        model = Path(os.environ.get("SOUVERAIN_MODEL", str(DEFAULT_MODEL))).expanduser()
    if not binary.is_file():
        pytest.fail(f"server binary {binary} not found (set SOUVERAIN_BIN or build it)")
    if not model.is_file():
        pytest.fail(f"model {model} not found (set SOUVERAIN_MODEL)")

    port = port or _free_port()
    root_url = f"http://127.0.0.1:{port}"
    cmd = [
        str(binary),
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        "2",
        *extra_args,
    ]
    if embedding_model:
        cmd += ["--embedding-model", str(Path(embedding_model).expanduser())]
    with tempfile.TemporaryDirectory(prefix="souverain-sdk-") as tmp:
        # Server output goes to a file, not a pipe: a pipe nobody reads can fill and stall it.
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        healthy = False
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _health_ok(root_url):
                if proc.poll() is not None:
                    pytest.fail(
                        f"server exited with status {proc.returncode} before becoming "
                        f"healthy; command {cmd}; output:\n{_read_log(log_path)}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s; command "
                        f"{cmd}; output:\n{_read_log(log_path)}"
                    )
                time.sleep(HEALTH_POLL_S)
            healthy = True

            client = openai.OpenAI(
                base_url=f"{root_url}/v1",
                api_key=api_key,
                timeout=REQUEST_TIMEOUT_S,
                # Retries would hide a failing request behind a later success.
                max_retries=0,
            )
            models = client.models.list().data
            # The chat models are listed first, then the embedding model when one is served.
            expected = chat_models + (1 if embedding_model else 0)
            if len(models) != expected:
                pytest.fail(f"expected {expected} served model(s), got {models!r}")
            yield Server(
                client=client,
                base_url=f"{root_url}/v1",
                root_url=root_url,
                model_id=models[0].id,
                embedding_model_id=models[chat_models].id if embedding_model else None,
            )
        finally:
            _stop(proc)
            # A server that dies after start-up (not from our SIGTERM) is worth seeing.
            if healthy and proc.returncode not in (0, -15, 143, None):
                print(f"server exited with {proc.returncode}; output:\n{_read_log(log_path)}")


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with _serve([], os.environ.get("SOUVERAIN_EMBEDDING_MODEL")) as s:
        yield s


# A chat template of our own in the Hermes/Qwen3 style (tools in the system turn, calls in
# <tool_call> tags, a <think> block opened by the generation prompt unless `enable_thinking`
# is false), so that the default model is served the way such models are.
THINKING_TEMPLATE = Path(__file__).resolve().parent / "templates" / "hermes-thinking.jinja"


@pytest.fixture(scope="session")
def thinking_server() -> Iterator[Server]:
    """The default model served with THINKING_TEMPLATE (`--chat-template-file`)."""
    with _serve(["--chat-template-file", str(THINKING_TEMPLATE)], None) as s:
        yield s


# Gemma 3 270M (Q4_K_M), the test-only model of scripts/fetch-test-models.
GEMMA_MODEL = Path(
    os.environ.get(
        "SOUVERAIN_TEST_GEMMA", "~/.cache/souverain/models/gemma-3-270m-q4_k_m.gguf"
    )
).expanduser()


@pytest.fixture(scope="session")
def gemma_server() -> Iterator[Server]:
    """Gemma 3 270M served with a 4096-token context (its trained 32k would allocate far more
    KV cache than two short requests need)."""
    with _serve(["--ctx-size", "4096"], None, model=GEMMA_MODEL) as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return server.client


@pytest.fixture(scope="session")
def model_id(server: Server) -> str:
    return server.model_id
