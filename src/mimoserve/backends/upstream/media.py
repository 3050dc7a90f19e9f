"""Checks image, audio and video parts before they are forwarded to an engine.

The server never fetches a client's URL itself: a URL is checked for its form and
scheme here, and its host for internal addresses in url_guard.py (engines fetch them).
Inline data must be a well-formed base64 data URL of the right media type, within a
size limit per kind.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mimoserve.backends.upstream.url_guard import MediaUrl, UrlAllowList
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.messages import AudioPart, ContentPart, ImagePart, VideoPart

_DATA_URL = re.compile(
    r"^data:(?P<mime>[a-z]+/[a-z0-9.+-]+)(?:;[a-z0-9=.+-]+)*;base64,(?P<data>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_MAX_URL_CHARS = 4096


@dataclass(frozen=True)
class MediaLimits:
    image_bytes: int = 10 << 20
    audio_bytes: int = 25 << 20
    video_bytes: int = 50 << 20
    url_schemes: frozenset[str] = frozenset({"https"})
    url_allow: UrlAllowList = field(default_factory=UrlAllowList)

    @classmethod
    def allowing(cls, allow_list: str) -> MediaLimits:
        """The default limits, with the operator's comma-separated internal hosts allowed."""
        return cls(url_allow=UrlAllowList.parse(allow_list.split(",")))


def _decoded_size(data: str, where: str, param: str) -> int:
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"{where} is not valid base64.", param=param,
                                  code="invalid_media") from exc  # fmt: skip


def check_source(
    value: str, *, kind: str, limit: int, schemes: frozenset[str], where: str, param: str,
    bare_base64: bool = False,
) -> str | None:  # fmt: skip
    """The URL's host when the source is a URL (checked later, off the loop), else None."""

    def refuse(why: str) -> InvalidRequestError:
        return InvalidRequestError(f"{where}: {why}", param=param, code="invalid_media")

    if value.startswith("data:"):
        match = _DATA_URL.match(value)
        if match is None:
            raise refuse("a data URL must look like data:<type>;base64,<data>.")
        if not match["mime"].lower().startswith(f"{kind}/"):
            raise refuse(f"the data URL holds {match['mime']}, not {kind}.")
        size = _decoded_size(match["data"], where, param)
    elif "://" in value[:16]:
        if len(value) > _MAX_URL_CHARS:
            raise refuse(f"the URL is longer than {_MAX_URL_CHARS} characters.")
        parts = urlsplit(value)
        if parts.scheme.lower() not in schemes:
            allowed = ", ".join(sorted(schemes))
            raise refuse(f"URLs must use {allowed} (or send the data inline as a data URL).")
        if not parts.hostname or parts.username or parts.password:
            raise refuse("the URL needs a host and must not carry credentials.")
        return parts.hostname
    elif bare_base64:
        size = _decoded_size(value, where, param)
    else:
        raise refuse("expected an https URL or a base64 data URL.")
    if size > limit:
        raise refuse(f"{size} bytes of {kind} is over the limit of {limit}.")
    return None


def content_parts(request: ChatCompletionRequest) -> Iterator[tuple[int, int, ContentPart]]:
    """(message index, part index, part) of every part of every array content."""
    for index, message in enumerate(request.messages):
        content = message.content
        if content is None or isinstance(content, str):
            continue
        for part_index, part in enumerate(content):
            yield index, part_index, part


def check_media(
    request: ChatCompletionRequest, modalities: Collection[str], limits: MediaLimits
) -> tuple[MediaUrl, ...]:
    """Raises a 400 naming the part and the model for media the model cannot take or
    that is malformed; returns the URLs whose hosts `refuse_internal_urls` must check."""
    urls: list[MediaUrl] = []
    for index, part_index, part in content_parts(request):
        param = f"messages.{index}.content.{part_index}"
        where = f"messages[{index}].content[{part_index}]"
        match part:
            case ImagePart():
                kind, source, limit = "image", part.image_url.url, limits.image_bytes
            case AudioPart():
                kind, source, limit = "audio", part.input_audio.data, limits.audio_bytes
            case VideoPart():
                kind, source, limit = "video", part.video_url.url, limits.video_bytes
            case _:
                continue
        if kind not in modalities:
            raise InvalidRequestError(
                f"{where} is a {part.type} part, but model {request.model!r} does not "
                f"accept {kind} input",
                param=param,
                code="unsupported_content",
            )
        host = check_source(source, kind=kind, limit=limit, schemes=limits.url_schemes,
                            where=where, param=param, bare_base64=kind == "audio")  # fmt: skip
        if host is not None:
            urls.append(MediaUrl(host, where, param))
    return tuple(urls)
