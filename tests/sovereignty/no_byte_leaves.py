"""No byte leaves (issue 20): `serve --auth`, `route --auth` and the admin commands run in a
network namespace that has loopback only (tests/sovereignty/run puts this script there),
every feature is exercised and must work, every `connect`/`sendto`/`sendmsg` of theirs
(strace -f) goes to loopback or a local socket, and with default retention no prompt marker
and no generated text is found in the data directory, the logs (RUST_LOG=debug) or any file
the run created under /tmp. Nothing is simulated."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_proc import (  # noqa: E402
    ADMIN_KEY, MODEL, MODEL_ID, admin, admin_json, free_port, request, spawn, stop, wait_port)

STRACE = ["strace", "-f", "-qq", "-s", "0", "-e", "trace=connect,sendto,sendmsg", "-o"]
LOCAL_FAMILIES = {"AF_UNIX", "AF_NETLINK", "AF_UNSPEC"}


def destinations(trace_text):
    """Every (family, address) a traced call named."""
    out = []
    for m in re.finditer(r"sa_family=(AF_[A-Z0-9]+)([^}]*)", trace_text):
        family, rest = m.group(1), m.group(2)
        addr = None
        if family == "AF_INET":
            a = re.search(r'inet_addr\("([^"]+)"\)', rest)
            addr = a.group(1) if a else "?"
        elif family == "AF_INET6":
            a = re.search(r'inet_pton\(AF_INET6, "([^"]+)"', rest)
            addr = a.group(1) if a else "?"
        out.append((family, addr))
    return out


def is_loopback(family, addr):
    if family in LOCAL_FAMILIES:
        return True
    if family == "AF_INET":
        return addr.startswith("127.")
    if family == "AF_INET6":
        return addr == "::1" or addr.startswith("::ffff:127.")
    return False


def sse_text(body):
    text = ""
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


def traced_children(pid):
    """The processes strace `pid` started (its direct children)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def main():
    assert os.geteuid() == 0, "run through tests/sovereignty/run (root, unshare --net)"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [l.split(":")[1].strip() for l in links.splitlines()]
    assert names == ["lo"], f"not in a loopback-only namespace: {names}"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    started = time.time() - 1
    work = tempfile.mkdtemp(prefix="souverain-sovereignty-")
    data = os.path.join(work, "data")
    logs = os.path.join(work, "logs")
    traces = os.path.join(work, "traces")
    for d in (data, logs, traces):
        os.makedirs(d)
    store = ["--data-dir", data]
    debug = {"RUST_LOG": "debug", "TMPDIR": "/tmp"}
    n_admin = [0]

    def traced(name):
        return STRACE + [os.path.join(traces, name)]

    def adm(args):
        n_admin[0] += 1
        return admin_json(store, args, env=debug, prefix=traced(f"admin-{n_admin[0]}"))

    org = adm(["org", "create", "Sovereign"])
    project = adm(["project", "create", org["id"], "app"])  # default retention: none
    key = adm(["key", "create", project["id"], "k"])["key"]

    serve_port, replica_port, route_port = free_port(), free_port(), free_port()
    embed = os.environ.get("SOUVERAIN_EMBEDDING_MODEL")
    serve_args = ["serve", "-m", MODEL, "--threads", "1", "--port", str(serve_port), "--auth",
                  "--region", "eu-west-paris"] + store
    if embed:
        serve_args += ["--embedding-model", embed]
    procs = []
    try:
        serve = spawn(serve_args, os.path.join(logs, "serve.log"), env=debug,
                      prefix=traced("serve"))
        procs.append(serve)
        replica = spawn(["serve", "-m", MODEL, "--threads", "1", "--port", str(replica_port)],
                        os.path.join(logs, "replica.log"), env=debug, prefix=traced("replica"))
        procs.append(replica)
        config = os.path.join(work, "router.toml")
        with open(config, "w") as f:
            f.write(f'[[upstream]]\nname = "r0"\nurl = "http://127.0.0.1:{replica_port}"\n'
                    'engine = "souverain"\nregion = "eu-west-paris"\n')
        router = spawn(["route", "--config", config, "--listen", f"127.0.0.1:{route_port}",
                        "--auth", "--region", "eu-west-paris"] + store,
                       os.path.join(logs, "route.log"), env=debug, prefix=traced("route"))
        procs.append(router)
        for port, p in ((serve_port, serve), (replica_port, replica), (route_port, router)):
            wait_port(port, p, timeout=120)

        markers, outputs = [], []

        def marker():
            m = "zq" + uuid.uuid4().hex[:16]
            markers.append(m)
            return m

        def chat(port, stream):
            body = {"model": MODEL_ID, "max_tokens": 16, "temperature": 0, "stream": stream,
                    "messages": [{"role": "user", "content": f"Repeat this code word: {marker()}"}]}
            r = request(port, "POST", "/v1/chat/completions", key, body)
            assert r and r[0] == 200, r
            text = sse_text(r[2]) if stream else json.loads(r[2])["choices"][0]["message"]["content"]
            outputs.append(text)

        def completion(port, stream):
            body = {"model": MODEL_ID, "max_tokens": 16, "temperature": 0, "stream": stream,
                    "prompt": f"The secret word {marker()} means"}
            r = request(port, "POST", "/v1/completions", key, body)
            assert r and r[0] == 200, r
            text = sse_text(r[2]) if stream else json.loads(r[2])["choices"][0]["text"]
            outputs.append(text)

        for port in (serve_port, route_port):
            for stream in (False, True):
                chat(port, stream)
                completion(port, stream)
        r = request(serve_port, "POST", "/tokenize", key, {"model": MODEL_ID, "prompt": marker()})
        assert r and r[0] == 200 and json.loads(r[2])["tokens"], r
        if embed:
            r = request(serve_port, "POST", "/v1/embeddings", key,
                        {"model": os.path.basename(embed.rstrip("/")), "input": [f"an embedded {marker()}"]})
            assert r and r[0] == 200 and json.loads(r[2])["data"][0]["embedding"], r
        for port in (serve_port, route_port):
            r = request(port, "GET", "/console/")
            assert r and r[0] == 200 and b"<html" in r[2].lower(), r
            r = request(port, "GET", "/v1/models", key)
            assert r and r[0] == 200, r
            r = request(port, "GET", "/admin/v1/usage", ADMIN_KEY)
            assert r and r[0] == 200, r
        usage = adm(["usage"])
        assert len(usage) >= 8, usage
        n_admin[0] += 1
        verify = admin(store, ["audit", "verify"], env=debug, prefix=traced(f"admin-{n_admin[0]}"))
        assert verify.returncode == 0, verify
        n_admin[0] += 1
        listed = admin(store, ["audit", "list"], env=debug, prefix=traced(f"admin-{n_admin[0]}"))
        assert listed.returncode == 0 and b"key.use" in listed.stdout, listed
    finally:
        for p in procs:
            # SIGTERM to the traced process itself: it ends as an operator would stop it, and
            # strace (its parent here) ends with it. Told to stop first, strace would detach
            # and leave the process running after the test.
            for child in traced_children(p.pid):
                try:
                    os.kill(child, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            if p.poll() is None:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        stop(p)

    # 1. Every destination is loopback or a local socket.
    calls, bad = 0, []
    for name in sorted(os.listdir(traces)):
        text = open(os.path.join(traces, name), errors="replace").read()
        calls += sum(1 for l in text.splitlines() if re.search(r"\b(connect|sendto|sendmsg)\(", l))
        for family, addr in destinations(text):
            if not is_loopback(family, addr):
                bad.append((name, family, addr))
    assert not bad, f"destinations outside loopback: {bad}"
    assert calls > 0, "strace saw no call: the trace is not working"

    # 2. No prompt marker and no generated text on disk or in the logs.
    needles = [m.encode() for m in markers]
    needles += [t.strip().encode() for t in outputs if len(t.strip()) >= 12]
    assert len(needles) > len(markers), f"no generated text long enough to look for: {outputs}"
    searched, found = 0, []
    candidates = [os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs]
    for dp, dirs, fs in os.walk("/tmp"):
        if dp.startswith(work):
            continue
        for f in fs:
            path = os.path.join(dp, f)
            try:
                if os.path.isfile(path) and os.path.getmtime(path) >= started:
                    candidates.append(path)
            except OSError:
                pass
    for path in candidates:
        if path.startswith(traces):
            continue  # strace's own output (-s 0: no buffers printed anyway)
        try:
            blob = open(path, "rb").read()
        except OSError:
            continue
        searched += 1
        found += [(path, n.decode()) for n in needles if n in blob]
    log_bytes = sum(os.path.getsize(os.path.join(logs, f)) for f in os.listdir(logs))
    assert log_bytes > 10_000, "the debug logs are nearly empty: RUST_LOG=debug did not apply"
    assert not found, f"request text found on disk: {found}"
    print(f"no byte leaves: {calls} traced connect/sendto/sendmsg calls, all to loopback or "
          f"local sockets; {len(needles)} markers and completions absent from {searched} files "
          f"({log_bytes} bytes of debug logs)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
