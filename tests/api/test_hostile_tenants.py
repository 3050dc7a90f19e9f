"""A hostile key holder against the platform (the scripted engine; the attacks that need
the real engine are in tests/e2e/test_hostile_tenants_real.py): each attack must leave
the budgets, the ledger and the other keys as they were promised."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimoserve.api.admin import csv_cell
from mimoserve.auth.keys import KeyStore
from mimoserve.backends.base import Capabilities
from mimoserve.config import Settings
from mimoserve.limits.policy import Limits
from mimoserve.metering.ledger import UsageLedger
from mimoserve.parsing.safe_json import loads_for_wire
from mimoserve.parsing.tool_formats import parse_mimo_xml
from mimoserve.store.base import Database
from mimoserve.store.usage import SqlUsageStore
from tests.api.registry_app import admin, key_id, serving
from tests.fake_backend import ScriptedBackend

PRICED = """
[models.mimo-v2-flash]
weights = "fake-weights"
price = { input = 2.0, output = 8.0 }
[models.mimo-xml]
weights = "fake-weights"
tool_parser = "mimo_xml"
"""
USER = [{"role": "user", "content": "hi"}]
BUDGET = 2000
# An engine that would write to the end of its context if nobody stopped it: each choice
# has more pieces (one token each) than the budget holds.
ENDLESS = ["x"] * 5000


@pytest.fixture
async def served(
    settings: Settings, database: Database, keys: KeyStore, backend: ScriptedBackend,
    api_key: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore]]:  # fmt: skip
    backend.capabilities = Capabilities(context_length=2048, choices=True)  # serves n > 1
    async with serving(PRICED, settings, database, keys, backend, api_key) as served_app:
        yield served_app


# Each door's attack: as many choices as it has, no output cap where the door allows
# none, generation past the end of the turn.
ATTACKS: dict[str, tuple[str, dict[str, Any], int]] = {
    "chat": ("/v1/chat/completions",
             {"model": "mimo-v2-flash", "messages": USER, "n": 8, "ignore_eos": True}, 8),
    "chat-stream": ("/v1/chat/completions",
                    {"model": "mimo-v2-flash", "messages": USER, "n": 8, "ignore_eos": True,
                     "stream": True}, 8),
    "responses": ("/v1/responses", {"model": "mimo-v2-flash", "input": "hi"}, 1),
    # Anthropic requires max_tokens (one that can never fit is a 402 at once).
    "messages": ("/v1/messages",
                 {"model": "mimo-v2-flash", "max_tokens": 900, "messages": USER}, 1),
}  # fmt: skip


@pytest.mark.parametrize("door", list(ATTACKS))
async def test_a_token_budget_attacked_on_every_door_holds(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    admin_token: str, api_key: str, door: str,
) -> None:  # fmt: skip
    client, ledger, usage = served
    path, body, choices = ATTACKS[door]
    put = await client.put(f"/admin/budgets/key/{key_id(api_key)}", headers=admin(admin_token),
                           json={"unit": "tokens", "amount": BUDGET, "period": "none"})  # fmt: skip
    assert put.status_code == 200
    statuses = []
    for _ in range(6):  # until refused
        for _ in range(choices):
            backend.enqueue(ENDLESS, prompt_tokens=7)
        response = await client.post(path, json=body)
        statuses.append(response.status_code)
        backend.scripts.clear()
        if response.status_code == 402:
            break
    assert statuses[-1] == 402, statuses
    await ledger.flush()
    spent = sum(r.prompt_tokens + r.completion_tokens for r in usage.records())
    # The slack: prompt tokens beyond the estimate the reservation made. This engine
    # reads fewer than estimated, so there is none.
    assert 0 < spent <= BUDGET, (statuses, spent)
    if door in ("chat", "responses"):
        # Without a cap of its own, the first request got what was left and stopped there.
        assert statuses[0] == 200
        first = usage.records()[0]
        assert first.finish_reason == "length" and first.completion_tokens > 100


async def test_an_explicit_cap_that_does_not_fit_is_402_not_an_overspend(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    admin_token: str, api_key: str,
) -> None:  # fmt: skip
    client, _, _ = served
    await client.put(f"/admin/budgets/key/{key_id(api_key)}", headers=admin(admin_token),
                     json={"unit": "tokens", "amount": 1000, "period": "none"})  # fmt: skip
    # 4 x 600 completion tokens can never fit in 1,000 (it used to be billed 2,433).
    body = {"model": "mimo-v2-flash", "messages": USER, "n": 4, "max_tokens": 600,
            "ignore_eos": True}  # fmt: skip
    for _ in range(4):
        backend.enqueue(ENDLESS)
    refused = await client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "insufficient_quota"


async def test_a_money_budget_caps_the_output_to_what_it_can_pay(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    admin_token: str, api_key: str,
) -> None:  # fmt: skip
    client, ledger, usage = served
    # 0.01 EUR = 10,000 micros; output costs 8 micros a token.
    await client.put(f"/admin/budgets/key/{key_id(api_key)}", headers=admin(admin_token),
                     json={"unit": "money", "amount": 0.01, "period": "none"})  # fmt: skip
    backend.enqueue(ENDLESS, prompt_tokens=7)
    answer = await client.post("/v1/chat/completions", json={"model": "mimo-v2-flash",
                                                             "messages": USER})  # fmt: skip
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    await ledger.flush()
    assert sum(r.cost_micros for r in usage.records()) <= 10_000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions",
         {"model": "mimo-v2-flash", "messages": USER, "max_tokens": int("1" + "0" * 400)}),
        ("/v1/messages",
         {"model": "mimo-v2-flash", "messages": USER, "max_tokens": int("1" + "0" * 400)}),
        ("/v1/responses",
         {"model": "mimo-v2-flash", "input": "hi", "max_output_tokens": int("1" + "0" * 400)}),
    ],
)  # fmt: skip
async def test_a_huge_max_tokens_on_a_priced_model_is_never_a_500(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], path: str,
    body: dict[str, Any],
) -> None:  # fmt: skip
    client, _, _ = served
    response = await client.post(path, content=json.dumps(body))
    assert response.status_code in (200, 400), response.text
    assert "error" not in response.json() or response.status_code == 400


async def test_n_choices_take_n_places_of_the_keys_concurrency(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], keys: KeyStore,
) -> None:  # fmt: skip
    client, _, _ = served
    key = keys.create("four", limits=Limits(max_concurrent=4)).secret
    body = {"model": "mimo-v2-flash", "messages": USER, "max_tokens": 2}
    eight = await client.post("/v1/chat/completions", json={**body, "n": 8},
                              headers={"api-key": key})  # fmt: skip
    assert eight.status_code == 429 and "8 concurrent places" in eight.json()["error"]["message"]
    four = await client.post("/v1/chat/completions", json={**body, "n": 4},
                             headers={"api-key": key})  # fmt: skip
    assert four.status_code == 200 and len(four.json()["choices"]) == 4


async def test_count_tokens_is_rate_limited_and_recorded(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], keys: KeyStore,
) -> None:  # fmt: skip
    client, ledger, usage = served
    key = keys.create("counter", limits=Limits(rpm=2)).secret
    body = {"model": "mimo-v2-flash", "messages": USER}
    statuses = [
        (
            await client.post("/v1/messages/count_tokens", json=body, headers={"api-key": key})
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    await ledger.flush()
    counted = [r for r in usage.records() if r.api == "messages.count_tokens"]
    assert [r.status for r in counted] == [200, 200, 429]
    assert all(r.prompt_tokens == 0 and r.completion_tokens == 0 for r in counted)


async def test_a_cancelled_wait_for_admission_settles_the_budget_hold(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    admin_token: str, api_key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    client, _, _ = served
    await client.put(f"/admin/budgets/key/{key_id(api_key)}", headers=admin(admin_token),
                     json={"unit": "tokens", "amount": 10_000, "period": "none"})  # fmt: skip
    from mimoserve.limits.limiter import RateLimiter

    waiting = asyncio.Event()

    async def stalls(self: RateLimiter, **_: Any) -> Any:  # a shared limiter that hangs
        waiting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(RateLimiter, "acquire", stalls)
    request = asyncio.create_task(client.post("/v1/chat/completions", json={
        "model": "mimo-v2-flash", "messages": USER}))  # fmt: skip
    await waiting.wait()
    status = (await client.get(f"/admin/budgets/key/{key_id(api_key)}",
                               headers=admin(admin_token))).json()  # fmt: skip
    assert status["reserved"] > 0  # held while it waits
    request.cancel()  # the client leaves while the request waits for admission
    await asyncio.gather(request, return_exceptions=True)

    async def reserved() -> int:
        view = (await client.get(f"/admin/budgets/key/{key_id(api_key)}",
                                 headers=admin(admin_token))).json()  # fmt: skip
        return int(view["reserved"])

    for _ in range(200):
        if await reserved() == 0:
            break
        await asyncio.sleep(0.01)
    assert await reserved() == 0


TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}}}}  # fmt: skip
HOSTILE_ARGUMENTS = [
    '{"q": "\\ud800"}',  # a lone surrogate, valid JSON, not UTF-8
    '{"q": NaN}',
    '{"q": Infinity, "r": -Infinity}',
    '{"q": 1e999}',
    '{"q": ' + "[" * 3000 + "]" * 3000 + "}",  # past the encoder's recursion limit
]


@pytest.mark.parametrize("arguments", HOSTILE_ARGUMENTS)
@pytest.mark.parametrize("door", ["messages", "responses"])
async def test_hostile_tool_call_arguments_never_turn_a_200_into_a_500(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    arguments: str, door: str,
) -> None:  # fmt: skip
    client, ledger, usage = served
    call = f'<tool_call>\n{{"name": "f", "arguments": {arguments}}}\n</tool_call>'
    backend.enqueue([call])
    if door == "messages":
        body: dict[str, Any] = {"model": "mimo-v2-flash", "max_tokens": 50, "messages": USER,
                                "tools": [{"name": "f", "input_schema": TOOL["function"]["parameters"]}]}  # type: ignore[index]  # fmt: skip
        response = await client.post("/v1/messages", json=body)
    else:
        body = {"model": "mimo-v2-flash", "input": "hi",
                "tools": [{"type": "function", "name": "f",
                           "parameters": TOOL["function"]["parameters"]}]}  # type: ignore[index]  # fmt: skip
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    response.json()  # well-formed JSON, UTF-8
    await ledger.flush()
    assert [r.status for r in usage.records()] == [200]


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_model_text_as_tool_input_is_encodable(text: str) -> None:
    value = loads_for_wire(text, fallback={})
    json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20))  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_any_json_value_survives_loads_for_wire(value: Any) -> None:
    text = json.dumps(value)  # NaN and Infinity included, as Python writes them
    decoded = loads_for_wire(text, fallback=None)
    json.dumps(decoded, ensure_ascii=False, allow_nan=False).encode("utf-8")


@pytest.mark.parametrize(
    "properties",
    [["x"], {"q": ["not", "a", "schema"]}, {"q": 3}, "q"],
)
async def test_a_malformed_tool_schema_is_a_400_naming_tools(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], properties: Any,
) -> None:  # fmt: skip
    client, _, _ = served
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": properties}}}  # fmt: skip
    response = await client.post("/v1/chat/completions", json={
        "model": "mimo-xml", "messages": USER, "tools": [tool]})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"


@pytest.mark.parametrize("schema", [{"properties": ["x"]}, {"properties": {"q": ["x"]}},
                                    {"properties": {"q": {"type": [{}, "integer"]}}}])  # fmt: skip
def test_the_mimo_xml_parser_survives_any_tool_schema(schema: dict[str, Any]) -> None:
    body = "<function=f>\n<parameter=q>\n42\n</parameter>\n</function>"
    parsed = parse_mimo_xml(body, {"f": schema})
    assert parsed is not None and json.loads(parsed.arguments)["q"] in ("42", 42)


@pytest.mark.parametrize("value", ["=1+2", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1"])
def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(value: str) -> None:
    assert csv_cell(value) == "'" + value
    assert csv_cell("mimo-v2-flash") == "mimo-v2-flash" and csv_cell(-3) == -3


async def test_a_refused_model_name_and_request_id_reach_the_csv_as_text(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], admin_token: str,
) -> None:  # fmt: skip
    client, ledger, _ = served
    refused = await client.post("/v1/chat/completions", json={"model": "=HYPERLINK(1)",
                                "messages": USER}, headers={"x-request-id": "=1+2"})  # fmt: skip
    assert refused.status_code == 404
    await ledger.flush()
    csv_text = (await client.get("/admin/usage.csv", headers=admin(admin_token))).text
    row = csv_text.splitlines()[1]
    assert "'=HYPERLINK(1)" in row
    assert ",=" not in row and not row.startswith("=")


async def test_the_open_metrics_page_names_no_account_or_key(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], admin_token: str,
    api_key: str,
) -> None:  # fmt: skip
    client, _, _ = served
    await client.put(f"/admin/budgets/key/{key_id(api_key)}", headers=admin(admin_token),
                     json={"unit": "tokens", "amount": 10, "period": "none"})  # fmt: skip
    await client.post("/v1/chat/completions", json={"model": "mimo-v2-flash",
                                                    "messages": USER})  # fmt: skip
    page = (await client.get("/metrics")).text
    assert key_id(api_key) not in page and "default" not in page.replace("default_", "")


@pytest.mark.parametrize(
    ("path", "body", "error_marker"),
    [
        ("/v1/chat/completions", {"model": "mimo-v2-flash", "messages": USER, "stream": True},
         '"error"'),
        ("/v1/messages", {"model": "mimo-v2-flash", "max_tokens": 10, "messages": USER,
                          "stream": True}, "event: error"),
        ("/v1/responses", {"model": "mimo-v2-flash", "input": "hi", "stream": True},
         "response.failed"),
    ],
)  # fmt: skip
async def test_a_bug_mid_stream_is_the_doors_error_event_and_never_its_text(
    served: tuple[httpx.AsyncClient, UsageLedger, SqlUsageStore], backend: ScriptedBackend,
    path: str, body: dict[str, Any], error_marker: str,
) -> None:  # fmt: skip
    client, _, _ = served
    backend.enqueue(["partial"], fail_with=RuntimeError("secret internal detail"))
    response = await client.post(path, json=body)
    assert response.status_code == 200  # the stream had begun
    assert error_marker in response.text
    assert "engine failed while generating" in response.text
    assert "secret internal detail" not in response.text
