"""Prometheus (Debian's `prometheus` package) and deploy/prometheus/: the scrape configuration
and rules pass `promtool check`, the rules' unit tests pass `promtool test rules`, and a real
Prometheus with the shipped jobs and rules scrapes a live `souverain serve`, `souverain route`
and `souverain picker --metrics-listen` on loopback: every target is up and the recording
rules yield values computed from what the processes exposed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import (
    REPO_ROOT,
    Fleet,
    Picker,
    Proc,
    Replica,
    chat,
    free_port,
    http_get,
    http_ok,
    wait_until,
)

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
JOBS = ("souverain-replica", "souverain-router", "souverain-picker")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install prometheus")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    config = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "2 rule files found" in config.stdout + config.stderr
    rules = promtool("check", "rules", *map(str, sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert [j["job_name"] for j in shipped["scrape_configs"]] == list(JOBS)


def test_the_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """The same unit tests against rules with a saturation threshold moved fail."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    alerts = copy / "rules" / "alerts.yml"
    text = alerts.read_text()
    assert "model:souverain_kv_cache_usage_ratio:max > 0.95" in text
    alerts.write_text(text.replace("model:souverain_kv_cache_usage_ratio:max > 0.95",
                                   "model:souverain_kv_cache_usage_ratio:max > 0.99"))
    result = promtool("test", "rules", str(copy / "tests" / "rules_test.yml"))
    assert result.returncode != 0
    assert "SouverainSaturated" in result.stdout + result.stderr


class Prometheus:
    def __init__(self, fleet: Fleet, targets: dict[str, list[str]]) -> None:
        workdir = fleet.workdir / "prometheus"
        (workdir / "targets").mkdir(parents=True)
        for job, addresses in targets.items():
            (workdir / "targets" / f"{job}.json").write_text(
                json.dumps([{"targets": addresses, "labels": {}}])
            )
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        # The shipped jobs and rules, scraped and evaluated every second for the test.
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s",
                            "scrape_timeout": "900ms"}
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.proc = fleet.proc("prometheus", [
            tool("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ])
        self.proc.wait_http(f"http://127.0.0.1:{self.port}/-/ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, text = http_get(url)
        assert status == 200, text
        body = json.loads(text)
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.fixture(scope="module")
def live(fleet: Fleet) -> Iterator[tuple[Replica, Proc, int, Picker]]:
    replica = fleet.replica("replica-0")
    config = fleet.router_config([replica])
    route_port = free_port()
    route = fleet.proc("route", [str(fleet.binary), "route", "--config", str(config),
                                 "--listen", f"127.0.0.1:{route_port}"])
    route.wait_http(f"http://127.0.0.1:{route_port}/health")
    picker = fleet.picker(config)
    yield replica, route, route_port, picker


def test_prometheus_scrapes_serve_route_and_picker_and_records(
    fleet: Fleet, live: tuple[Replica, Proc, int, Picker]
) -> None:
    replica, _, route_port, picker = live
    prometheus = Prometheus(fleet, {
        "souverain-replica": [replica.authority],
        "souverain-router": [f"127.0.0.1:{route_port}"],
        "souverain-picker": [f"127.0.0.1:{picker.metrics_port}"],
    })

    def all_up() -> bool:
        results = prometheus.query("up")
        return sorted((r["metric"]["job"], r["value"][1]) for r in results) == [
            (job, "1") for job in sorted(JOBS)
        ]

    wait_until(all_up, 30, "every target up", poll_s=0.25)

    # Traffic through the router while Prometheus scrapes, so the rates are not zero.
    stop = threading.Event()

    def traffic() -> None:
        import http.client

        n = 0
        while not stop.is_set() and n < 500:
            n += 1
            conn = http.client.HTTPConnection("127.0.0.1", route_port, timeout=30)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(f"hi {n}", 8)),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            conn.close()

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        def recorded(promql: str) -> bool:
            return any(float(r["value"][1]) > 0 for r in prometheus.query(promql))

        wait_until(lambda: recorded("model:souverain_generation_tokens:rate1m"), 30,
                   "a generation rate recorded from the replica", poll_s=0.25)
        wait_until(lambda: recorded('outcome:souverain_router_requests:rate1m{outcome="ok"}'), 30,
                   "the router's request rate recorded", poll_s=0.25)
    finally:
        stop.set()
        sender.join(timeout=60)
    tokens = prometheus.query("model:souverain_generation_tokens:rate1m")
    assert [r["metric"] for r in tokens] == [{"__name__": "model:souverain_generation_tokens:rate1m",
                                             "model_name": "smollm"}]
    healthy = {r["metric"]["job"]: r["value"][1] for r in prometheus.query(
        "instance:souverain_router_upstreams_healthy:sum or instance:souverain_picker_upstreams_healthy:sum")}
    assert healthy == {"souverain-router": "1", "souverain-picker": "1"}
    p95 = prometheus.query("model:souverain_time_to_first_token_seconds:p95_5m")
    assert len(p95) == 1 and 0 < float(p95[0]["value"][1]) < 60, p95
    assert prometheus.query('ALERTS{alertstate="firing"}') == []
    print(
        f"prometheus: {len(JOBS)} targets up; generation "
        f"{float(tokens[0]['value'][1]):.1f} tokens/s, TTFT p95 {float(p95[0]['value'][1]):.3f} s"
    )
    assert http_ok(f"{picker.metrics_url}/health")
