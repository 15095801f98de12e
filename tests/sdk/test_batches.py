"""OpenAI's Files and Batch APIs through the official `openai` SDK (`client.files`,
`client.batches`) against `souverain serve --auth`: upload, batch over chat completions,
completions, embeddings and responses, output and error files in input order, the same
answers as the same requests sent one by one (greedy), metering per request, cancel, list,
retention (zero retention: files gone once downloaded), bad input refused with nothing kept,
and a batch resumed after the server is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest
from conftest import Server, _serve, admin

EMBEDDING_MODEL = os.environ.get("SOUVERAIN_EMBEDDING_MODEL")


class Site:
    def __init__(self, data_dir: Path, server: Server, keys: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.server = server
        self.keys = keys
        self.model = server.model_id
        self.clients = {
            name: openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)
            for name, key in keys.items()
        }


def make_keys(data_dir: Path) -> dict[str, str]:
    org = admin(data_dir, "org", "create", "acme")["id"]
    keeper = admin(data_dir, "project", "create", org, "keeper", "--retention-secs", "3600")
    forgetful = admin(data_dir, "project", "create", org, "forgetful")
    other_org = admin(data_dir, "org", "create", "globex")["id"]
    other = admin(data_dir, "project", "create", other_org, "theirs")
    return {
        name: admin(data_dir, "key", "create", project["id"], name)["key"]
        for name, project in (("keeper", keeper), ("forgetful", forgetful), ("other", other))
    }


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with tempfile.TemporaryDirectory(prefix="souverain-batches-") as tmp:
        data_dir = Path(tmp)
        keys = make_keys(data_dir)
        args = ["--auth", "--data-dir", str(data_dir)]
        with _serve(args, EMBEDDING_MODEL, api_key=keys["keeper"]) as server:
            yield Site(data_dir, server, keys)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


MODEL = Path(os.environ.get("SOUVERAIN_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")).stem


def chat_line(custom_id: str, text: str, max_tokens: int = 6) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": max_tokens,
        },
    }


def wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_chat_batch_answers_as_requests_sent_one_by_one(site: Site) -> None:
    client, model = site.clients["keeper"], site.model
    questions = [f"Name a colour number {i}." for i in range(6)]
    lines = [chat_line(f"q{i}", q) for i, q in enumerate(questions)]
    assert model == MODEL
    # One request names a model the server does not serve: it fails, alone.
    bad = chat_line("bad", "hi")
    bad["body"]["model"] = "no-such-model"
    upload = client.files.create(file=("in.jsonl", jsonl(lines + [bad])), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0
    assert client.files.retrieve(upload.id).filename == "in.jsonl"
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "colours"},
    )
    assert batch.status == "in_progress" and batch.metadata == {"run": "colours"}
    done = wait_done(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    out = results(client, done.output_file_id)
    assert [r["custom_id"] for r in out] == [f"q{i}" for i in range(6)]
    errors = results(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    for r, q in zip(out, questions):
        assert r["response"]["status_code"] == 200
        alone = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=6
        )
        assert r["response"]["body"]["choices"][0]["message"]["content"] == alone.choices[0].message.content
    # Each request of the batch was metered as the key's use.
    usage = admin(site.data_dir, "usage")
    ids = {u["id"] for u in usage}
    assert all(r["response"]["body"]["id"] in ids for r in out)
    # Listed, newest first; files listed; the project's retention keeps the output.
    assert client.batches.list(limit=1).data[0].id == batch.id
    assert upload.id in {f.id for f in client.files.list().data}
    assert results(client, done.output_file_id) == out


def test_completions_embeddings_and_responses_batches(site: Site) -> None:
    client, model = site.clients["keeper"], site.model
    cases = [
        ("/v1/completions", {"model": model, "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0}),
        ("/v1/responses", {"model": model, "input": "Say hi.", "max_output_tokens": 4, "temperature": 0}),
    ]
    if EMBEDDING_MODEL:
        embedder = [m.id for m in client.models.list().data][-1]
        cases.append(("/v1/embeddings", {"model": embedder, "input": "a sentence to embed"}))
    for endpoint, body in cases:
        lines = [{"custom_id": f"{i}", "method": "POST", "url": endpoint, "body": body} for i in range(2)]
        upload = client.files.create(file=("x.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
        done = wait_done(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 2, (endpoint, done)
        bodies = [r["response"]["body"] for r in results(client, done.output_file_id)]
        assert [r["custom_id"] for r in results(client, done.output_file_id)] == ["0", "1"]
        if endpoint == "/v1/completions":
            answers = [b["choices"][0]["text"] for b in bodies]
        elif endpoint == "/v1/responses":
            answers = [
                [i for i in b["output"] if i["type"] == "message"][0]["content"][0]["text"]
                for b in bodies
            ]
        else:
            answers = [b["data"][0]["embedding"] for b in bodies]
        # Greedy: the same request gives the same answer.
        assert answers[0] == answers[1] and answers[0], (endpoint, bodies)


def test_bad_input_is_refused_and_nothing_is_kept(site: Site) -> None:
    client = site.clients["keeper"]
    before = [e for e in admin(site.data_dir, "audit", "list") if e["action"].startswith(("file.", "batch."))]
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("x.jsonl", b'{"custom_id":"a","method":"POST","url":"/v1/completions","body":{}}\nnot json\n'), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="used twice"):
        client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi"), chat_line("a", "ho")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="stream"):
        line = chat_line("a", "hi")
        line["body"]["stream"] = True
        client.files.create(file=("x.jsonl", jsonl([line])), purpose="batch")
    good = client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=good.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="input_file_id"):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    # Another organisation's key sees none of it.
    other = site.clients["other"]
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(good.id)
    with pytest.raises(openai.BadRequestError):
        other.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    after = [e for e in admin(site.data_dir, "audit", "list") if e["action"].startswith(("file.", "batch."))]
    # Only the one good upload was kept.
    assert [e["action"] for e in after[len(before):]] == ["file.create"]
    client.files.delete(good.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(good.id)


def test_zero_retention_lets_outputs_go_once_read(site: Site) -> None:
    client = site.clients["forgetful"]
    upload = client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    done = wait_done(client, client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert done.status == "completed"
    # The input went when the batch ended; the output goes ten minutes after its first
    # download (a day before it).
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
    assert done.output_file_id is not None
    before = client.files.retrieve(done.output_file_id).expires_at
    assert before is not None and before > time.time() + 3600
    assert len(results(client, done.output_file_id)) == 1
    after = client.files.retrieve(done.output_file_id).expires_at
    assert after is not None and after <= time.time() + 600 + 5


def test_cancel_stops_a_batch(site: Site) -> None:
    client = site.clients["keeper"]
    lines = [chat_line(f"c{i}", f"Count to {i}.", max_tokens=32) for i in range(60)]
    upload = client.files.create(file=("x.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.5)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_done(client, batch.id)
    assert done.status == "cancelled"
    assert done.request_counts is not None and done.request_counts.completed < 60
    assert len(results(client, done.output_file_id)) == done.request_counts.completed


def test_a_batch_resumes_after_the_server_is_killed() -> None:
    with tempfile.TemporaryDirectory(prefix="souverain-batches-kill-") as tmp:
        data_dir = Path(tmp)
        keys = make_keys(data_dir)
        args = ["--auth", "--data-dir", str(data_dir), "--batch-concurrency", "2"]
        lines = [chat_line(f"k{i}", f"Tell me about the number {i}.", max_tokens=24) for i in range(24)]
        with _serve(args, None, api_key=keys["keeper"]) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=keys["keeper"], max_retries=0)
            upload = client.files.create(file=("x.jsonl", jsonl(lines)), purpose="batch")
            batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
            deadline = time.monotonic() + 120
            while (client.batches.retrieve(batch.id).request_counts.completed or 0) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            # Killed mid-batch, no chance to finish anything.
            port = server.root_url.rsplit(":", 1)[1]
            pids = subprocess.run(
                ["pgrep", "-f", f"serve .*--port {port}"], capture_output=True, text=True
            ).stdout.split()
            assert pids, "the server's process was not found"
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
        # Restarted on the same host and port: it takes its batch back at once (another server
        # sharing the store would after a minute without progress).
        started = time.monotonic()
        with _serve(args, None, api_key=keys["keeper"], port=int(port)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=keys["keeper"], max_retries=0)
            done = wait_done(client, batch.id)
            assert time.monotonic() - started < 45
            assert done.status == "completed"
            assert done.request_counts.total == 24
            out = results(client, done.output_file_id)
            assert [r["custom_id"] for r in out] == [f"k{i}" for i in range(24)]
        # Requests finished before the kill were not sent again: at most the two in flight
        # when it came were (each metered once per time it ran).
        sent = [u for u in admin(data_dir, "usage") if u["status"] == "ok"]
        assert 24 <= len(sent) <= 26, len(sent)
