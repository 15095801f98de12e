"""The server the suite's clients talk to is up and serves both models."""

from __future__ import annotations

import json
import urllib.request

from conftest import Server


def test_the_server_lists_both_models(server: Server) -> None:
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=30) as r:
        ids = [m["id"] for m in json.loads(r.read())["data"]]
    assert ids == [server.model, server.embedding_model]
