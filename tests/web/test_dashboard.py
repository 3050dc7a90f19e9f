"""The dashboard end to end in headless Chromium (Debian's), driven by Playwright.

A real uvicorn server runs in a thread with a scripted backend, so the playground's
stream (reasoning, then an answer, then a tool call) arrives piece by piece on cue.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from mimoserve.app import create_app
from mimoserve.auth.admin import AdminCredential
from mimoserve.auth.keys import KeyStore
from mimoserve.config import Settings
from mimoserve.metering.ledger import UsageLedger, UsageRecord
from mimoserve.registry import ModelRegistry
from mimoserve.store.sqlite import SqliteDatabase
from mimoserve.store.usage import SqlUsageStore
from tests.conftest import REGISTRY
from tests.fake_backend import ScriptedBackend
from tests.services import uvicorn_in_thread

CHROMIUM = "/usr/bin/chromium"
# Chromium's background connections are refused by this closed network; keep it quiet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
KEY = re.compile(r"^mimo-[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")


@dataclass
class Site:
    url: str
    admin_token: str
    keys: KeyStore
    backend: ScriptedBackend


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    database = SqliteDatabase(tmp_path / "m.db")
    keys, usage = KeyStore(database), SqlUsageStore(database)
    token = AdminCredential(database).rotate()
    now = time.time()
    usage.insert_usage([  # some history for the charts
        UsageRecord("k-one", "mimo-v2-flash", 200, 40, 20, created_at=now - 7200),
        UsageRecord("k-one", "mimo-v2-pro", 200, 10, 90, created_at=now - 3600,
                    cached_tokens=8, draft_tokens=80, accepted_draft_tokens=60),
        UsageRecord("k-two", "mimo-v2-flash", 200, 5, 5, created_at=now - 60),
    ])  # fmt: skip
    registry = ModelRegistry.from_toml(REGISTRY)
    backend = ScriptedBackend()
    app = create_app(
        Settings(home=tmp_path), registry=registry, keys=keys, admin=AdminCredential(database),
        usage=usage, ledger=UsageLedger(usage, flush_interval_s=0.05),
        backends={entry.id: backend for entry in registry.entries()},
    )  # fmt: skip
    with uvicorn_in_thread(app) as url:
        yield Site(url, token, keys, backend)


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        from tests.services import _missing

        _missing("Chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def sign_in(page: Page, site: Site) -> None:
    page.goto(f"{site.url}/dashboard/")
    page.fill("#admin-token", site.admin_token)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#tabs")).to_be_visible()


def in_the_playground(browser: Browser, site: Site, key_name: str) -> Page:
    """Signed in, a new key made (the playground takes it), the playground open."""
    page = browser.new_page()
    sign_in(page, site)
    page.fill("#key-form input[name=name]", key_name)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible()
    page.click("#tabs [data-tab=playground]")
    return page


def rendered(page: Page, path: Path) -> None:
    """A screenshot that shows a real page: big enough and far from one flat colour."""
    png = page.screenshot(path=path, full_page=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 15_000, len(png)


def test_sign_in_needs_the_admin_token(site: Site, browser: Browser, tmp_path: Path) -> None:
    page = browser.new_page()
    page.goto(f"{site.url}/dashboard/")
    page.fill("#admin-token", "mimo-admin-wrong")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("Invalid admin token")
    expect(page.locator("#tabs")).to_be_hidden()
    ordinary_key = site.keys.create("not-admin").secret
    page.fill("#admin-token", ordinary_key)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("Invalid admin token")
    rendered(page, tmp_path / "signin.png")


def test_accounts_and_keys_create_copy_once_revoke(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, site)
    expect(page.locator("#accounts-table tbody tr")).to_have_count(1)  # the default account
    page.fill("#account-form input[name=name]", "research")
    page.fill("#account-form input[name=rpm]", "30")
    page.click("#account-form button[type=submit]")
    expect(page.locator("#accounts-table tbody tr.selected")).to_contain_text("research")
    expect(page.locator("#keys-account")).to_have_text("research")

    page.fill("#key-form input[name=name]", "laptop")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible()
    secret = page.locator("#new-key-secret").inner_text()
    assert KEY.match(secret), secret
    principal = site.keys.authenticate(secret)
    assert principal is not None and principal.key_name == "laptop"
    assert site.keys.account(principal.account_id).name == "research"  # type: ignore[union-attr]
    page.click("#copy-key")
    expect(page.locator("#copy-status")).to_have_text(re.compile("Copied|Selected"))
    expect(page.locator("#keys-table tbody tr")).to_contain_text(["laptop"])
    rendered(page, tmp_path / "keys.png")

    page.reload()  # shown once: after leaving the page the secret is nowhere
    expect(page.locator("#tabs")).to_be_visible()  # still signed in (this tab's session)
    page.locator("#accounts-table tbody tr", has_text="research").click()
    expect(page.locator("#keys-table tbody tr")).to_contain_text(["laptop"])
    assert secret not in page.content()

    page.locator("#keys-table tbody tr", has_text="laptop").locator("button.revoke").click()
    expect(page.locator("#keys-table tbody tr", has_text="laptop")).to_contain_text("revoked")
    assert site.keys.authenticate(secret) is None  # effective on the next request


def test_usage_charts_per_model_and_key(site: Site, browser: Browser, tmp_path: Path) -> None:
    page = browser.new_page()
    sign_in(page, site)
    page.click("#tabs [data-tab=usage]")
    expect(page.locator("#chart-models rect.bar")).to_have_count(3)
    expect(page.locator("#chart-models .legend")).to_contain_text("mimo-v2-flash")
    expect(page.locator("#chart-models .legend")).to_contain_text("mimo-v2-pro")
    expect(page.locator("#chart-keys .legend")).to_contain_text("k-one")
    expect(page.locator("#chart-keys .legend")).to_contain_text("k-two")
    expect(page.locator("#usage-table tbody tr")).to_have_count(3)
    # Speculative decoding's acceptance rate, where the engine guessed.
    pro = page.locator("#usage-table tbody tr", has_text="mimo-v2-pro")
    expect(pro).to_contain_text("75% of 80")
    # The prefix cache's hit rate (any tier): 8 of its 10 prompt tokens.
    expect(pro.locator("td").nth(7)).to_have_text("80%")
    box = page.locator("#chart-models svg").bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100
    rendered(page, tmp_path / "usage.png")


def test_playground_streams_reasoning_content_and_tool_calls(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    # Prompted thinking: the prompt opens <think>, so the model's text starts inside it.
    text = ('The user wants weather.</think>Let me check.'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')  # fmt: skip
    pieces = [text[i : i + 6] for i in range(0, len(text), 6)]
    site.backend.enqueue(pieces, delay_s=0.15)
    page = in_the_playground(browser, site, "playground")
    page.select_option("#chat-model", "mimo-v2-pro")
    page.check("#chat-thinking")
    page.check("#chat-tools")
    page.click("#chat-send")
    # Reasoning shows while the rest is still on its way.
    expect(page.locator("#out-reasoning")).to_contain_text("The user")
    assert page.locator("#out-tools").inner_text() == ""
    assert page.locator("#chat-status").inner_text() == "Streaming…"
    expect(page.locator("#out-reasoning")).to_have_text("The user wants weather.")
    expect(page.locator("#out-content")).to_have_text("Let me check.")
    expect(page.locator("#out-tools")).to_have_text('get_weather({"city": "Paris"})')
    expect(page.locator("#chat-status")).to_contain_text("completion tokens")
    request = site.backend.requests[-1]
    assert request.tools and request.tools[0]["function"]["name"] == "get_weather"
    rendered(page, tmp_path / "playground.png")


def test_budgets_set_flagged_reset_and_shown_per_key(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    page = browser.new_page()
    sign_in(page, site)
    laptop = site.keys.create("laptop")
    page.reload()
    expect(page.locator("#keys-table tbody tr", has_text="laptop")).to_contain_text("no budget")
    # A token budget for the key that holds one capped answer: 30 tokens, all of which
    # the first request reserves (its prompt is estimated at 23 tokens, so its answer is
    # capped at 7 of the 8 the engine would write) and spends.
    page.select_option("#budget-form select[name=owner]", f"key:{laptop.info.id}")
    page.fill("#budget-form input[name=amount]", "30")
    page.select_option("#budget-form select[name=period]", "day")
    page.click("#budget-form button[type=submit]")
    row = page.locator("#budgets-table tbody tr", has_text="key laptop")
    expect(row).to_contain_text("30 tokens")
    # The status cell itself: "ok" is also inside "tokens", so the whole row's text would
    # match before a reset has landed (a flaky race with the next request).
    status = row.locator("td").nth(7)
    expect(status).to_have_text("ok")

    site.backend.enqueue(["a"] * 8, prompt_tokens=23)  # 23 + 7: the whole budget
    chat = {"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"api-key": laptop.secret}
    assert (
        httpx.post(f"{site.url}/v1/chat/completions", json=chat, headers=headers).status_code == 200
    )
    refused = httpx.post(f"{site.url}/v1/chat/completions", json=chat, headers=headers)
    assert refused.status_code == 402
    page.reload()
    expect(status).to_have_text("spent (402)")
    expect(row.locator("td.warn")).to_have_count(1)
    expect(page.locator("#keys-table tbody tr", has_text="laptop")).to_contain_text("30 tokens")
    rendered(page, tmp_path / "budgets.png")

    row.locator("button.reset").click()
    expect(status).to_have_text("ok")
    assert (
        httpx.post(f"{site.url}/v1/chat/completions", json=chat, headers=headers).status_code == 200
    )
    row.locator("button.remove").click()
    expect(page.locator("#budgets-table tbody tr")).to_have_count(0)


def test_request_log_filters_pages_and_exports(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    usage = SqlUsageStore(SqliteDatabase(tmp_path / "m.db"))
    now = time.time()
    usage.insert_usage([  # a refused request that named no model, then 30 more
        UsageRecord("k-two", "", 400, created_at=now - 30, http_request_id="bad-body"),
        *(UsageRecord("k-one", "mimo-v2-flash", 402 if i % 10 == 0 else 200, 5, 5,
                      created_at=now - 20 + i / 10, http_request_id=f"r{i}") for i in range(30)),
    ])  # fmt: skip
    page = browser.new_page()
    sign_in(page, site)
    page.click("#tabs [data-tab=requests]")
    rows = page.locator("#requests-table tbody tr")
    expect(rows).to_have_count(25)
    expect(rows.first).to_contain_text("r29")  # newest first
    page.click("#requests-older")
    expect(rows.first).to_contain_text("r4")
    expect(page.locator("#requests-older")).to_be_disabled()  # 34 requests: two pages
    expect(rows.filter(has_text="bad-body")).to_contain_text("(no model)")
    page.click("#requests-newer")
    expect(rows.first).to_contain_text("r29")
    page.select_option("#requests-form select[name=status]", "402")
    page.click("#requests-form button[type=submit]")
    expect(rows).to_have_count(3)
    page.select_option("#requests-form select[name=status]", "errors")
    page.select_option("#requests-form select[name=key]", "k-two")
    page.click("#requests-form button[type=submit]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("bad-body")
    rendered(page, tmp_path / "requests.png")

    page.click("#tabs [data-tab=usage]")
    expect(page.locator("#chart-models .legend")).to_contain_text("(no model)")
    expect(page.locator("#chart-models text.tick").first).to_be_visible()  # a time axis
    assert page.locator("#chart-models text.tick").count() >= 5
    expect(page.locator("#usage-summary")).to_contain_text("34 requests")
    expect(page.locator("#total-models")).to_contain_text("in total")
    with page.expect_download() as download:
        page.click("#export-csv")
    exported = Path(download.value.path()).read_text()
    assert exported.startswith("time_utc,key_id") and exported.count("\n") == 35
    rendered(page, tmp_path / "usage-axis.png")


def test_limits_are_editable_and_connect_shows_this_server(
    site: Site, browser: Browser, tmp_path: Path
) -> None:
    worker = site.keys.create("worker")
    page = browser.new_page()
    sign_in(page, site)
    page.fill("#account-limits-form input[name=rpm]", "120")
    page.click("#account-limits-form button[type=submit]")
    expect(page.locator("#accounts-table tbody tr", has_text="default")).to_contain_text("120")
    assert site.keys.account("default").limits.rpm == 120  # type: ignore[union-attr]

    row = page.locator("#keys-table tbody tr", has_text="worker")
    expect(row).to_contain_text("account's")
    row.locator("button.limits").click()
    page.fill("#key-limits-form input[name=tpm]", "5000")
    page.fill("#key-limits-form input[name=max_concurrent]", "2")
    page.click("#key-limits-form button[type=submit]")
    expect(row).to_contain_text("\u2013 / 5000 / 2")
    principal = site.keys.authenticate(worker.secret)
    assert principal is not None and principal.key_limits.tpm == 5000
    assert principal.key_limits.max_concurrent == 2

    page.click("#tabs [data-tab=connect]")
    expect(page.locator("#snippet-openai")).to_contain_text(f'base_url="{site.url}/v1"')
    expect(page.locator("#snippet-curl")).to_contain_text(f"{site.url}/v1/chat/completions")
    expect(page.locator("#snippet-claude")).to_contain_text(
        f"ANTHROPIC_BASE_URL={site.url}/anthropic"
    )
    expect(page.locator("#snippet-claude")).to_contain_text("CLAUDE_STREAM_IDLE_TIMEOUT_MS=")
    expect(page.locator("#snippet-codex")).to_contain_text('wire_api = "responses"')
    rendered(page, tmp_path / "connect.png")


@pytest.fixture
def speech_site(tmp_path: Path) -> Iterator[Site]:
    from tests.api.test_speech import REGISTRY as SPEECH_REGISTRY
    from tests.fake_speech import speech_backends

    database = SqliteDatabase(tmp_path / "m.db")
    keys, usage = KeyStore(database), SqlUsageStore(database)
    token = AdminCredential(database).rotate()
    registry = ModelRegistry.from_toml(SPEECH_REGISTRY)
    backend = ScriptedBackend()
    speech = speech_backends()
    app = create_app(
        Settings(home=tmp_path), registry=registry, keys=keys, admin=AdminCredential(database),
        usage=usage, ledger=UsageLedger(usage, flush_interval_s=0.05),
        backends={entry.id: speech.get(entry.id, backend) for entry in registry.entries()},
    )  # fmt: skip
    with uvicorn_in_thread(app) as url:
        yield Site(url, token, keys, backend)


def test_playground_speaks_the_answer_and_transcribes_a_file(
    speech_site: Site, browser: Browser, tmp_path: Path
) -> None:
    from tests.api.test_speech import tone

    speech_site.backend.enqueue(["One two three. Four five."])
    page = in_the_playground(browser, speech_site, "speech")
    expect(page.locator("#speech-model option")).to_have_count(1)  # tts; not tts-voicedesign
    page.select_option("#chat-model", "text")
    page.click("#chat-send")
    expect(page.locator("#out-content")).to_have_text("One two three. Four five.")
    page.click("#speak")
    expect(page.locator("#speech-status")).to_have_text("Spoken: 2 s of audio.")
    player = page.locator("#speech-audio")
    expect(player).to_have_js_property("readyState", 4)  # the page's policy lets it play
    duration = player.evaluate("audio => audio.duration")
    assert abs(duration - 5 * 0.25) < 0.05  # five words of the scripted voice
    recording = tmp_path / "question.wav"
    recording.write_bytes(tone(3.0))
    page.set_input_files("#asr-file", str(recording))
    page.click("#transcribe")
    expect(page.locator("#speech-status")).to_have_text("Transcribed 3 s of audio.")
    expect(page.locator("#chat-input")).to_have_value("tick0 tick1 tick2")
    rendered(page, tmp_path / "speech.png")
