"""Start `souverain serve --auth` (an admin key, a fresh data directory) and open Chromium on it.

Environment:
    SOUVERAIN_BIN       the server binary (default: <repo>/target/release/souverain)
    SOUVERAIN_MODEL     the GGUF model to serve
                        (default: ~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf)
    SOUVERAIN_CHROMIUM  the browser (default: /usr/bin/chromium, Debian's `chromium` package)

Screenshots go to <repo>/target/console-screenshots/.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, sync_playwright

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("SOUVERAIN_BIN", REPO_ROOT / "target" / "release" / "souverain"))
MODEL = Path(
    os.environ.get(
        "SOUVERAIN_MODEL", "~/.cache/souverain/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
).expanduser()
CHROMIUM = Path(os.environ.get("SOUVERAIN_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO_ROOT / "target" / "console-screenshots"
STARTUP_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class Server:
    """A running `serve --auth`: where it listens and its admin key."""

    root_url: str
    admin_key: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(root_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root_url}/health", timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    for path, what in [(BINARY, "SOUVERAIN_BIN"), (MODEL, "SOUVERAIN_MODEL"), (CHROMIUM, "SOUVERAIN_CHROMIUM")]:
        if not path.is_file():
            pytest.fail(f"{path} not found (set {what})")
    with tempfile.TemporaryDirectory(prefix="souverain-console-") as tmp:
        admin_key = secrets.token_urlsafe(24)
        key_file = Path(tmp) / "admin.key"
        key_file.write_text(admin_key)
        port = _free_port()
        root_url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        cmd = [
            str(BINARY), "serve", "--model", str(MODEL), "--host", "127.0.0.1",
            "--port", str(port), "--threads", "2", "--auth", "--data-dir", str(Path(tmp) / "data"),
            "--admin-key-file", str(key_file),
        ]
        # A file, not a pipe: a pipe nobody reads can fill and stall the server.
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _healthy(root_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start: {cmd}\n{log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.2)
            yield Server(root_url=root_url, admin_key=admin_key, log=log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@dataclasses.dataclass
class Console:
    """One browser tab on the console, with every request it made and every dialog it opened."""

    page: Page
    context: BrowserContext
    requests: list[str]
    dialogs: list[str]
    errors: list[str]


@pytest.fixture(scope="module")
def console(browser: Browser, server: Server) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    requests: list[str] = []
    dialogs: list[str] = []
    errors: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Script errors; refused requests (a revoked key's 401, `serve`'s 404 for the replicas)
    # are answers the page expects.
    page.on(
        "console",
        lambda m: errors.append(m.text)
        if m.type == "error" and not m.text.startswith("Failed to load resource")
        else None,
    )
    page.set_default_timeout(60_000)
    page.goto(f"{server.root_url}/console")
    yield Console(page=page, context=context, requests=requests, dialogs=dialogs, errors=errors)
    context.close()


def screenshot(page: Page, name: str) -> Path:
    """Writes a full-page screenshot at 360 px and at 1280 px wide; returns the folder."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or {"width": 1280, "height": 900}
    for width in (360, 1280):
        page.set_viewport_size({"width": width, "height": 800})
        page.wait_for_timeout(100)
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size(size)
    return SCREENSHOTS


def same_origin(url: str, root_url: str) -> bool:
    return url.startswith(root_url + "/") or url.startswith(f"blob:{root_url}/") or url.startswith("data:")


__all__ = ["Console", "Request", "Server", "same_origin", "screenshot"]
