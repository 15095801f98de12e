"""Faults under load (issue 20), each a few seconds of real load on the real binary:

1. PostgreSQL stopped and started again under `serve --auth --database-url`;
2. the SQLite volume full (`--data-dir` on a 2 MiB tmpfs, filled by a file) under `serve --auth`;
3. a replica killed (-9), then the router (`route --auth`) killed (-9), under load.

During each fault a request is answered 200 or refused with a JSON error (a clear status); afterwards,
with no restart of ours where none is needed (only the killed router is started again), every
200 a client received is in the usage records and the audit log verifies. Nothing is simulated:
the PostgreSQL server really stops, the file system is really full, the processes are really
killed. Needs root (mount) and PostgreSQL (`SOUVERAIN_TEST_DATABASE_URL`, `scripts/ci/postgres`)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_proc import (  # noqa: E402
    MODEL, MODEL_ID, ROOT, admin, admin_json, free_port, request, spawn, stop, wait_port)

CLEAR = {429, 500, 502, 503, 504}


class Load:
    """Clients sending short completions until stopped; every answer is classified."""

    def __init__(self, port, key, clients=3, id_header=None):
        self.port, self.key, self.id_header = port, key, id_header
        self.accepted, self.refused, self.broken, self.unclear = [], {}, 0, []
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self):
        body = {"model": MODEL_ID, "prompt": "The capital of France is", "max_tokens": 3,
                "temperature": 0}
        while self.running:
            r = request(self.port, "POST", "/v1/completions", self.key, body, timeout=30)
            with self.lock:
                if r is None:
                    self.broken += 1
                    time.sleep(0.05)
                    continue
                status, headers, payload = r
                try:
                    doc = json.loads(payload)
                except ValueError:
                    doc = None
                if status == 200 and doc is not None:
                    rid = headers.get(self.id_header) if self.id_header else doc["id"]
                    self.accepted.append(rid)
                elif status in CLEAR and doc is not None and "error" in doc:
                    self.refused[status] = self.refused.get(status, 0) + 1
                else:
                    self.unclear.append((status, payload[:200]))
            if status != 200:
                time.sleep(0.05)

    def wait_accepted(self, n, timeout=60):
        deadline = time.time() + timeout
        while len(self.accepted) < n and time.time() < deadline:
            time.sleep(0.02)
        assert len(self.accepted) >= n, f"only {len(self.accepted)} answers"

    def count(self):
        with self.lock:
            return len(self.accepted), dict(self.refused), self.broken

    def stop(self):
        self.running = False
        for t in self.threads:
            t.join(timeout=60)


def setup_key(store):
    org = admin_json(store, ["org", "create", "Faults"])
    project = admin_json(store, ["project", "create", org["id"], "app"])
    key = admin_json(store, ["key", "create", project["id"], "load", "--budget-tokens",
                             "100000000", "--budget-period", "month"])
    return key["key"]


def all_recorded(store, accepted, timeout=30):
    """Polls until every accepted id is a usage record; returns (missing, records)."""
    deadline = time.time() + timeout
    while True:
        out = admin(store, ["usage"])
        ids = set()
        if out.returncode == 0:
            ids = {u["id"] for u in json.loads(out.stdout)}
        missing = [a for a in accepted if a not in ids]
        if not missing or time.time() > deadline:
            return missing, len(ids)
        time.sleep(0.5)


def verify_audit(store):
    out = admin(store, ["audit", "verify"])
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    return out.stdout.decode().strip()


def serve_auth(work, store, name):
    port = free_port()
    p = spawn(["serve", "-m", MODEL, "--threads", "1", "--port", str(port), "--auth",
               "--region", "eu-west-paris"] + store, os.path.join(work, f"{name}.log"))
    wait_port(port, p)
    return port, p


def report(name, load, missing, records, audit):
    accepted, refused, broken = load.count()
    print(f"{name}: {accepted} answered 200, refused {refused or 'none'}, {broken} connections "
          f"broken, {len(load.unclear)} unclear; {records} usage records, {len(missing)} "
          f"answered but missing; audit: {audit}")
    assert not load.unclear, f"{name}: unclear answers {load.unclear[:5]}"
    assert not missing, f"{name}: answered but not recorded: {missing[:5]}"


def postgres_restarted(work):
    url = os.environ.get("SOUVERAIN_TEST_DATABASE_URL")
    if not url:
        if os.environ.get("SOUVERAIN_REQUIRE_POSTGRES"):
            raise AssertionError("SOUVERAIN_TEST_DATABASE_URL is not set")
        print("postgres restarted: SKIPPED (no SOUVERAIN_TEST_DATABASE_URL)")
        return
    db = "souverain_faults_" + uuid.uuid4().hex[:8]
    psql = sorted(p for p in os.listdir("/usr/lib/postgresql"))[-1]
    subprocess.run([f"/usr/lib/postgresql/{psql}/bin/psql", url, "-qc", f"CREATE DATABASE {db}"],
                   check=True)
    store = ["--data-dir", os.path.join(work, "pg-data"), "--database-url",
             url.rsplit("/", 1)[0] + "/" + db]
    key = setup_key(store)
    port, serve = serve_auth(work, store, "serve-pg")
    pg = os.path.join(ROOT, "scripts/ci/postgres")
    try:
        load = Load(port, key)
        load.wait_accepted(10)
        subprocess.run([pg, "stop"], check=True, capture_output=True)
        before = load.count()
        time.sleep(3)
        during = load.count()
        subprocess.run([pg, "start"], check=True, capture_output=True)
        time.sleep(3)
        load.stop()
        assert serve.poll() is None, "serve died while PostgreSQL was down"
        print(f"postgres restarted: during the 3 s outage {during[0] - before[0]} answered 200, "
              f"refused {({k: v - before[1].get(k, 0) for k, v in during[1].items()})}")
        missing, records = all_recorded(store, load.accepted)
        report("postgres restarted", load, missing, records, verify_audit(store))
        assert load.count()[1].get(503), "no request saw the outage (503)"
    finally:
        subprocess.run([pg, "start"], capture_output=True)
        stop(serve)


def sqlite_full(work):
    mnt = os.path.join(work, "tmpfs")
    os.makedirs(mnt)
    # 2 MiB: the database, its write-ahead log and what a few seconds of refusals queue up
    # must all fit again once space is freed (SOUVERAIN_FAULTS_VOLUME overrides the size).
    size = os.environ.get("SOUVERAIN_FAULTS_VOLUME", "2m")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
    serve = None
    try:
        data = os.path.join(mnt, "data")
        store = ["--data-dir", data]
        key = setup_key(store)
        port, serve = serve_auth(work, store, "serve-full")
        load = Load(port, key)
        load.wait_accepted(10)
        # Fill the volume: whatever SQLite asks for next fails with SQLITE_FULL.
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\1" * 4096)
            except OSError:
                pass
        before = load.count()
        time.sleep(4)
        during = load.count()
        os.remove(filler)
        time.sleep(3)
        load.stop()
        assert serve.poll() is None, "serve died while the disk was full"
        print(f"sqlite full: during the 4 s without space {during[0] - before[0]} answered 200, "
              f"refused {({k: v - before[1].get(k, 0) for k, v in during[1].items()})}")
        missing, records = all_recorded(store, load.accepted)
        sizes = {f: os.path.getsize(os.path.join(data, f)) // 1024 for f in sorted(os.listdir(data))
                 if f.startswith("control.")}
        print(f"sqlite full: files on the {size} volume afterwards (KiB): {sizes}")
        report("sqlite full", load, missing, records, verify_audit(store))
        assert load.count()[1].get(503), "no request saw the full disk (503)"
    finally:
        stop(serve)
        subprocess.run(["umount", mnt], check=False)


def router_killed(work):
    data = os.path.join(work, "route-data")
    store = ["--data-dir", data]
    key = setup_key(store)
    replicas, ports = [], []
    for i in range(2):
        port = free_port()
        p = spawn(["serve", "-m", MODEL, "--threads", "1", "--port", str(port)],
                  os.path.join(work, f"replica-{i}.log"))
        replicas.append(p)
        ports.append(port)
    config = os.path.join(work, "router.toml")
    with open(config, "w") as f:
        f.write("[scrape]\ninterval_ms = 200\n[proxy]\nretries = 2\n")
        for i, port in enumerate(ports):
            f.write(f'[[upstream]]\nname = "r{i}"\nurl = "http://127.0.0.1:{port}"\n'
                    'engine = "souverain"\nregion = "eu-west-paris"\n')
    route_port = free_port()

    def start_router():
        p = spawn(["route", "--config", config, "--listen", f"127.0.0.1:{route_port}", "--auth",
                   "--region", "eu-west-paris"] + store, os.path.join(work, "route.log"))
        wait_port(route_port, p)
        return p

    router = None
    try:
        for port, p in zip(ports, replicas):
            wait_port(port, p)
        router = start_router()
        load = Load(route_port, key, clients=4, id_header="x-souverain-request-id")
        load.wait_accepted(10)
        stop(replicas[0])  # kill -9
        a = load.count()
        load.wait_accepted(a[0] + 10)
        b = load.count()
        print(f"replica killed: then {b[0] - a[0]} answered 200 by the other, refused "
              f"{({k: v - a[1].get(k, 0) for k, v in b[1].items()})}, {b[2] - a[2]} broken")
        stop(router)  # kill -9, clients mid-request
        time.sleep(1)
        load.stop()
        router = start_router()
        r = request(route_port, "POST", "/v1/completions", key,
                    {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2})
        assert r and r[0] == 200, f"the restarted router does not serve: {r}"
        missing, records = all_recorded(store, load.accepted)
        report("replica and router killed", load, missing, records, verify_audit(store))
    finally:
        stop(router)
        for p in replicas:
            stop(p)


def main():
    assert os.geteuid() == 0, "needs root (mount -t tmpfs)"
    work = tempfile.mkdtemp(prefix="souverain-faults-")
    scenarios = {"postgres": postgres_restarted, "sqlite-full": sqlite_full,
                 "router": router_killed}
    chosen = sys.argv[1:] or list(scenarios)
    for name in chosen:
        started = time.time()
        scenarios[name](work)
        print(f"  ({name}: {time.time() - started:.1f} s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
