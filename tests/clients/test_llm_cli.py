"""Simon Willison's `llm` CLI against the server, run as a user runs it: the server's model
registered in `extra-openai-models.yaml` of a fresh LLM_USER_PATH, a prompt printing, streamed
and not, what `/v1/chat/completions` answers to the same request, `--schema` printing JSON the
server constrained to the schema, `llm openai endpoint` listing the server's models and
prompting without any configuration, and an unknown model name failing with the server's 404.

llm 0.36 registers OpenAI-compatible embedding models only through plugins (its built-in
OpenAI embedding models always talk to OpenAI's own model names), so `llm embed` is not used.
Every `llm` run pays a few seconds of imports: the runs a test needs start together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import Server

LLM = Path(sys.executable).with_name("llm")
PROMPT = "What is the capital of France?"
EXTRACT = "Alice is 30 years old. Extract the person."


@pytest.fixture
def user_dir(server: Server, tmp_path: Path) -> Path:
    """An llm user directory knowing the server's model, and a model the server does not have."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        "- model_id: souverain\n"
        f"  model_name: {server.model}\n"
        f"  api_base: {server.base_url}\n"
        "  supports_schema: true\n"
        "- model_id: nowhere\n"
        "  model_name: no-such-model\n"
        f"  api_base: {server.base_url}\n"
    )
    return tmp_path


def run_all(user_dir: Path, *commands: list[str]) -> list[tuple[int, str, str]]:
    """Runs the commands side by side; their (returncode, stdout, stderr) in order. Each has
    a user directory of its own (a copy of `user_dir`), as two llm processes creating one
    logs.db at once collide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    procs = []
    for i, command in enumerate(commands):
        own = user_dir / f"run-{i}"
        shutil.copytree(user_dir, own, ignore=shutil.ignore_patterns("run-*"))
        procs.append(
            subprocess.Popen(
                [str(LLM), *command], env={**env, "LLM_USER_PATH": str(own)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append((proc.returncode, out, err))
    return results


def direct_chat(server: Server, body: dict) -> str:
    body = {"model": server.model, **body}
    req = urllib.request.Request(
        f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


GREEDY = ["-o", "temperature", "0", "-o", "max_tokens", "8"]


def test_prompt_prints_the_servers_answer(server: Server, user_dir: Path) -> None:
    (rc_s, streamed, err_s), (rc_w, whole, err_w) = run_all(
        user_dir,
        ["-m", "souverain", PROMPT, *GREEDY],
        ["-m", "souverain", PROMPT, *GREEDY, "--no-stream"],
    )
    assert rc_s == 0, err_s
    assert rc_w == 0, err_w
    expected = direct_chat(
        server,
        {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 8},
    )
    assert expected.strip()
    assert streamed == expected + "\n"
    assert whole == expected + "\n"


def test_schema_prints_json_of_the_schema(server: Server, user_dir: Path) -> None:
    ((rc, out, err),) = run_all(
        user_dir,
        ["-m", "souverain", EXTRACT, "--schema", "name, age int", "-o", "temperature", "0"],
    )
    assert rc == 0, err
    got = json.loads(out)
    # The schema llm makes of 'name, age int' leaves the object open; the server closes it.
    assert set(got) == {"name", "age"}
    assert isinstance(got["name"], str) and type(got["age"]) is int
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    expected = direct_chat(
        server,
        {
            "messages": [{"role": "user", "content": EXTRACT}],
            "temperature": 0,
            "response_format": {
                "type": "json_schema", "json_schema": {"name": "output", "schema": schema}
            },
        },
    )
    assert got == json.loads(expected)


def test_openai_endpoint_needs_no_configuration(server: Server, tmp_path: Path) -> None:
    (rc_m, models, err_m), (rc_p, out, err_p) = run_all(
        tmp_path,
        ["openai", "endpoint", server.base_url, "--models"],
        ["openai", "endpoint", server.base_url, "-m", server.model, PROMPT, *GREEDY],
    )
    assert rc_m == 0, err_m
    assert models.split() == [server.model, server.embedding_model]
    assert rc_p == 0, err_p
    expected = direct_chat(
        server,
        {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 8},
    )
    assert out == expected + "\n"


def test_unknown_model_fails_with_the_404(user_dir: Path) -> None:
    ((rc, out, err),) = run_all(user_dir, ["-m", "nowhere", PROMPT, "-o", "max_tokens", "4"])
    assert rc != 0
    assert out == ""
    assert "404" in err and "no-such-model" in err and "does not exist" in err, err
