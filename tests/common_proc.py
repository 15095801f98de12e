"""Helpers the sovereignty and fault suites share: start the binary, wait for a port, HTTP
with the standard library only (no virtual environment, nothing fetched)."""

import http.client
import json
import os
import random
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("SOUVERAIN_BIN", os.path.join(ROOT, "target/release/souverain"))
MODEL = os.environ.get(
    "SOUVERAIN_TEST_MODEL",
    os.path.expanduser("~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
)
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
ADMIN_KEY = "sk-admin-faults-and-sovereignty-0123456789"
REGION = "eu-west-paris"


_GIVEN = set()


def free_port():
    """A port nothing is bound to now, never one this process was given before, and below the
    kernel's ephemeral range. Port 0 would do neither: the kernel may hand the same port to two
    callers before either server binds it (a router then "listening" on its replica's port), and
    client sockets take ephemeral ports at any time."""
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randint(20_000, 32_000)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port between 20000 and 32000")


def wait_port(port, proc=None, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def spawn(args, log_path, env=None, prefix=()):
    e = dict(os.environ)
    e.setdefault("RUST_LOG", "warn")
    e["SOUVERAIN_ADMIN_KEY"] = ADMIN_KEY
    if env:
        e.update(env)
    log = open(log_path, "ab")
    return subprocess.Popen(
        list(prefix) + [BIN] + list(args),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=e,
    )


def admin(store_args, args, env=None, prefix=()):
    e = dict(os.environ)
    e.setdefault("RUST_LOG", "warn")
    if env:
        e.update(env)
    out = subprocess.run(
        list(prefix) + [BIN, "admin"] + list(store_args) + ["--region", REGION] + list(args),
        capture_output=True,
        env=e,
        timeout=120,
    )
    return out


def admin_json(store_args, args, **kw):
    out = admin(store_args, args, **kw)
    assert out.returncode == 0, f"admin {args}: {out.stderr.decode(errors='replace')}"
    return json.loads(out.stdout)


def request(port, method, path, key=None, body=None, timeout=60, headers=None):
    """One request; (status, headers dict, body bytes), or None if the connection broke."""
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if headers:
        h.update(headers)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    except (OSError, http.client.HTTPException):
        return None


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
