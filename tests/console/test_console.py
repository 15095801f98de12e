"""The console in Chromium against a real `souverain serve --auth` and the default model.

The tests of this module run in order on one tab: sign in, create an organisation (with a
hostile name), a project and a key; chat with the key; a hostile model answer; revoke the key
and see the next request refused; verify the audit log; usage charts and export. The last
test checks that no request of the whole session left the server's origin.
"""

from __future__ import annotations

import json
import re

from playwright.sync_api import expect

from conftest import Console, Server, same_origin, screenshot

HOSTILE = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"
# What a model is made to answer through a JSON schema whose only value is this string.
HOSTILE_ANSWER = "<img src=x onerror=window.__xss=1> <script>window.__xss=2</script> **done**"


def no_script_ran(console: Console) -> None:
    assert console.page.evaluate("() => window.__xss") is None
    assert console.dialogs == []


def go(console: Console, view: str) -> None:
    console.page.locator(f'.tabs a[data-view="{view}"]').click()
    expect(console.page.locator(f"#view-{view}")).to_be_visible()


def test_signing_in_needs_the_admin_key(console: Console, server: Server) -> None:
    page = console.page
    expect(page).to_have_url(f"{server.root_url}/console/")
    go_to = page.locator('.tabs a[data-view="organisations"]')
    go_to.click()
    expect(page.locator("#view-signin")).to_be_visible()
    page.fill("#admin-key", "not-the-admin-key")
    page.keyboard.press("Enter")
    expect(page.locator("#signin-status")).to_have_text("This admin key was refused.")
    page.fill("#admin-key", server.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#view-organisations")).to_be_visible()
    expect(page.locator("#session-state")).to_have_text("Signed in as admin")
    # The key is nowhere but in the page's memory.
    assert server.admin_key not in page.url
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
    assert page.context.cookies() == []
    # `serve` is no router: no replicas view.
    expect(page.locator("#nav-replicas")).to_be_hidden()


def test_an_organisation_project_and_key_are_created(console: Console) -> None:
    page = console.page
    page.fill("#org-name", HOSTILE)
    page.fill("#org-regions", "local, eu-west")
    page.get_by_role("button", name="Create organisation").click()
    expect(page.locator("#orgs-status")).to_have_text(f"Organisation {HOSTILE} created.")
    # The name is text wherever it shows: nothing of it became an element.
    expect(page.locator("#org-detail-title")).to_have_text(HOSTILE)
    expect(page.locator("#org-list")).to_contain_text(HOSTILE)
    assert page.locator("main img, main script").count() == 0
    page.fill("#project-name", "Playground project")
    page.fill("#project-retention", "3600")
    page.get_by_role("button", name="Create project").click()
    expect(page.locator("#project-detail-title")).to_have_text("Playground project")
    page.fill("#key-name", "console key")
    page.fill("#key-rpm", "600")
    page.fill("#key-budget", "100000")
    page.select_option("#key-period", "day")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-value")
    expect(secret).to_have_text(re.compile(r"^sk-sov-[A-Za-z0-9]+$"))
    expect(page.locator("#key-table tbody tr")).to_have_count(1)
    expect(page.locator("#key-table tbody")).to_contain_text("600 req/min")
    expect(page.locator("#key-table tbody")).to_contain_text("budget 100,000 tokens/day")
    page.get_by_role("button", name="Use in the playground").click()
    # Shown once: dismissed, it is gone from the page.
    page.get_by_role("button", name="Done").click()
    expect(page.locator("#new-key")).to_be_hidden()
    assert page.locator("#new-key-value").text_content() == ""
    no_script_ran(console)


def test_a_chat_streams_its_answer(console: Console, server: Server) -> None:
    page = console.page
    go(console, "playground")
    expect(page.locator("#pg-model option")).not_to_have_count(0)
    page.fill("#pg-system", "You are a helpful assistant.")
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-input", "What is the capital of France?")
    with page.expect_response(f"{server.root_url}/v1/chat/completions") as answer:
        # Keyboard: Ctrl+Enter sends.
        page.locator("#pg-input").press("Control+Enter")
    response = answer.value
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    sent = json.loads(response.request.post_data or "{}")
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert response.request.headers["authorization"].startswith("Bearer sk-sov-")
    last = page.locator("#transcript .message.assistant").last
    expect(last.locator(".stats")).to_contain_text("TTFT", timeout=60_000)
    expect(last.locator(".stats")).to_contain_text("tokens/s")
    expect(last.locator(".stats")).to_contain_text("completion tokens")
    assert last.locator(".markdown").inner_text().strip() != ""
    screenshot(page, "playground")


def test_a_hostile_model_answer_renders_as_text(console: Console) -> None:
    page = console.page
    page.get_by_role("button", name="Clear").click()
    page.select_option("#pg-format", "json_schema")
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": [HOSTILE_ANSWER]}},
        "required": ["answer"],
    }
    page.fill("#pg-schema", json.dumps(schema))
    page.fill("#pg-max-tokens", "96")
    page.fill("#pg-input", "Answer.")
    page.get_by_role("button", name="Send").click()
    last = page.locator("#transcript .message.assistant").last
    expect(last.locator(".stats")).to_contain_text("finish: stop", timeout=60_000)
    text = last.locator(".markdown").inner_text()
    assert "<img src=x onerror=window.__xss=1>" in text
    assert "<script>window.__xss=2</script>" in text
    # Markdown around it still renders (the answer's **done** is bold), as elements we made.
    expect(last.locator(".markdown strong")).to_have_text("done")
    assert last.locator("img, script").count() == 0
    page.wait_for_timeout(300)
    no_script_ran(console)
    page.select_option("#pg-format", "text")


def test_markdown_is_rendered_safely(console: Console) -> None:
    page = console.page
    shape = page.evaluate(
        """async () => {
            const { render } = await import("/console/assets/markdown.js");
            const box = document.createElement("div");
            box.append(render([
                "# Title", "", "Some *em*, **strong**, `code` and snake_case_name.",
                "", "- one", "- two", "", "1. first", "", "```js", "let a = '<b>';", "```",
                "", "[ok](https://example.org/x) [bad](javascript:alert(1)) <b>raw</b>",
            ].join("\\n")));
            return {
                h: box.querySelector("h3")?.textContent,
                em: box.querySelector("em")?.textContent,
                strong: box.querySelector("strong")?.textContent,
                code: box.querySelector("p code")?.textContent,
                items: box.querySelectorAll("ul li").length,
                ordered: box.querySelectorAll("ol li").length,
                pre: box.querySelector("pre code")?.textContent,
                links: [...box.querySelectorAll("a")].map((a) => [a.href, a.rel]),
                bold: box.querySelectorAll("b").length,
                text: box.textContent,
            };
        }"""
    )
    assert shape["h"] == "Title"
    assert shape["em"] == "em" and shape["strong"] == "strong" and shape["code"] == "code"
    assert shape["items"] == 2 and shape["ordered"] == 1
    assert shape["pre"] == "let a = '<b>';"
    assert shape["links"] == [["https://example.org/x", "noopener noreferrer"]]
    assert shape["bold"] == 0
    assert "snake_case_name" in shape["text"]
    assert "[bad](javascript:alert(1)) <b>raw</b>" in shape["text"]


def test_a_revoked_key_is_refused(console: Console, server: Server) -> None:
    page = console.page
    go(console, "organisations")
    revoke = page.get_by_role("button", name="Revoke console key")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")
    revoke.click()
    expect(page.locator("#orgs-status")).to_have_text("Key console key revoked.")
    expect(page.locator("#key-table tbody")).to_contain_text("revoked")
    go(console, "playground")
    page.fill("#pg-input", "Are you there?")
    with page.expect_response(f"{server.root_url}/v1/chat/completions") as answer:
        page.get_by_role("button", name="Send").click()
    assert answer.value.status == 401
    expect(page.locator("#pg-status")).to_contain_text("revoked")
    expect(page.locator("#transcript .message.assistant .error").last).to_contain_text("revoked")


def test_the_audit_log_verifies_and_searches(console: Console) -> None:
    page = console.page
    go(console, "audit")
    expect(page.locator("#audit-table tbody tr")).not_to_have_count(0)
    page.get_by_role("button", name="Verify the chain").click()
    verdict = page.locator("#audit-result")
    expect(verdict).to_have_class(re.compile(r"\bok\b"))
    expect(verdict).to_contain_text("is intact")
    page.fill("#audit-search", "key.revoke")
    rows = page.locator("#audit-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("admin")
    expect(page.locator("#audit-table")).not_to_contain_text("org.create")
    expect(page.locator("#audit-status")).to_contain_text("1 of ")
    page.fill("#audit-search", "")
    # The hostile name is in the log's detail as text too.
    assert page.locator("main img, main script").count() == 0


def test_usage_is_charted_and_exported(console: Console) -> None:
    page = console.page
    go(console, "usage")
    # Usage records carry each request's energy (modelled here), so its chart is drawn too.
    expect(page.locator("#usage-charts figure")).to_have_count(3)
    expect(page.locator("#usage-charts figure h2")).to_have_text(
        ["Tokens", "Requests", "Energy (J)"]
    )
    assert page.locator("#usage-charts svg rect").count() >= 2
    expect(page.locator("#usage-charts .legend").first).to_contain_text(HOSTILE)
    expect(page.locator("#usage-table tbody tr")).to_have_count(1)
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    csv = open(download.value.path(), encoding="utf-8").read()
    assert csv.splitlines()[0].startswith("org,day,requests")
    assert len(csv.splitlines()) == 2
    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    exported = json.load(open(download.value.path(), encoding="utf-8"))
    assert exported["group_by"] == ["org", "day"] and len(exported["data"]) == 1
    screenshot(page, "usage")
    page.locator("#theme-toggle").click()
    assert page.evaluate("() => document.documentElement.dataset.theme") in ("dark", "light")
    no_script_ran(console)


def test_every_request_stayed_on_the_servers_origin(console: Console, server: Server) -> None:
    assert len(console.requests) >= 10, console.requests
    outside = [u for u in console.requests if not same_origin(u, server.root_url)]
    assert outside == []
    # Nothing asked for the hostile markup's image.
    assert not any(u.rstrip("/").endswith("/x") for u in console.requests)
    # The key never travelled in a URL.
    assert not any("sk-sov-" in u or server.admin_key in u for u in console.requests)
    assert console.errors == []
