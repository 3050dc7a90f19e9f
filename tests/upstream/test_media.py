from __future__ import annotations

import base64
from typing import Any

import pytest

from mimoserve.backends.upstream.media import MediaLimits, check_media
from mimoserve.backends.upstream.url_guard import UrlAllowList, refuse_internal_urls
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.chat import ChatCompletionRequest

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake image bytes").decode()
ALL = frozenset({"text", "image", "audio", "video"})


def request(*parts: dict[str, Any], model: str = "mimo-v2-omni") -> ChatCompletionRequest:
    content = [{"type": "text", "text": "what is this?"}, *parts]
    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": content}]}
    )


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_well_formed_media_passes() -> None:
    check_media(request(
        image(PNG), image("https://example.com/cat.png"),
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(),
                                                "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}, "fps": 2},
    ), ALL, MediaLimits())  # fmt: skip


@pytest.mark.parametrize(("part", "why"), [
    (image("http://169.254.169.254/latest/meta-data"), "https"),
    (image("file:///etc/passwd"), "https"),
    (image("ftp://example.com/a.png"), "https"),
    (image("https://user:pw@example.com/a.png"), "credentials"),
    (image("data:image/png;base64,not base64!!"), "base64"),
    (image("data:text/html;base64,PGgxPg=="), "not image"),
    (image("data:image/png,rawdata"), "data URL"),
    (image("just-a-string"), "https URL or a base64"),
    ({"type": "input_audio", "input_audio": {"data": "%%%"}}, "base64"),
    ({"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}}, "not video"),
])  # fmt: skip
def test_malformed_or_unsafe_media_is_a_400_naming_the_part(part: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_media(request(part), ALL, MediaLimits())
    assert refused.value.status_code == 400 and why in refused.value.message
    assert refused.value.param == "messages.0.content.1"


def test_size_limit_per_kind() -> None:
    big = "data:image/png;base64," + base64.b64encode(b"x" * 2048).decode()
    with pytest.raises(InvalidRequestError, match="over the limit"):
        check_media(request(image(big)), ALL, MediaLimits(image_bytes=1024))


def test_model_without_the_modality_names_part_and_model() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_media(request(image(PNG), model="mimo-v2-flash"), frozenset({"text"}), MediaLimits())
    message = refused.value.message
    assert "messages[0].content[1]" in message and "mimo-v2-flash" in message and "image" in message


def hosts_of(*urls: str) -> tuple[str, ...]:
    found = check_media(request(*(image(u) for u in urls)), ALL, MediaLimits())
    return tuple(url.host for url in found)


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/a.png",
    "https://localhost/a.png",
    "https://169.254.169.254/latest/meta-data/",  # cloud metadata
    "https://10.1.2.3/a.png",
    "https://192.168.0.1/a.png",
    "https://[::1]/a.png",
    "https://[::ffff:127.0.0.1]/a.png",
    "https://[fe80::1]/a.png",
    "https://100.64.0.1/a.png",  # carrier-grade NAT
    "https://0.0.0.0/a.png",
])  # fmt: skip
async def test_urls_into_the_internal_network_are_refused(url: str) -> None:
    urls = check_media(request(image(url)), ALL, MediaLimits())
    with pytest.raises(InvalidRequestError) as refused:
        await refuse_internal_urls(urls, UrlAllowList())
    assert refused.value.status_code == 400 and refused.value.param == "messages.0.content.1"


async def test_public_addresses_and_allowed_internal_ones_pass() -> None:
    await refuse_internal_urls(check_media(request(image("https://93.184.216.34/a.png")), ALL,
                                           MediaLimits()), UrlAllowList())  # fmt: skip
    allow = UrlAllowList.parse(["localhost", "10.0.0.0/8"])
    internal = request(image("https://localhost/a.png"), image("https://10.9.9.9/b.png"))
    await refuse_internal_urls(check_media(internal, ALL, MediaLimits()), allow)
    with pytest.raises(InvalidRequestError):
        await refuse_internal_urls(check_media(request(image("https://192.168.1.1/")), ALL,
                                               MediaLimits()), allow)  # fmt: skip


async def test_an_unresolvable_host_is_refused() -> None:
    urls = check_media(request(image("https://no-such-host.invalid/a.png")), ALL, MediaLimits())
    with pytest.raises(InvalidRequestError, match="cannot be resolved"):
        await refuse_internal_urls(urls, UrlAllowList())


def test_data_urls_have_no_host_to_check() -> None:
    assert hosts_of(PNG, "https://example.com/x.png") == ("example.com",)
