"""The audio a request carries: `input_audio` parts as bytes.

Inline data (a data URL or bare base64) is checked for size at `prepare`; a URL is
fetched here, by the server itself (the embedded engines have no fetcher of their own),
under the same rules as media URLs relayed to engines: https only, no credentials, no
host that resolves to an internal address, no redirects (one could lead inside), and
no more bytes than the inline limit.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import aiohttp

from mimoserve.backends.upstream.media import MediaLimits, check_source, content_parts
from mimoserve.backends.upstream.url_guard import MediaUrl, refuse_internal_urls
from mimoserve.errors import InvalidRequestError
from mimoserve.protocol.chat import ChatCompletionRequest
from mimoserve.protocol.messages import AudioPart

_FETCH_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class AudioSource:
    value: str  # a data URL, bare base64, or a URL
    where: str  # "messages[0].content[1]"
    param: str
    host: str | None  # the URL's host; None for inline data

    def refuse(self, why: str) -> InvalidRequestError:
        return InvalidRequestError(f"{self.where}: {why}", param=self.param, code="invalid_audio")


def audio_sources(request: ChatCompletionRequest, limits: MediaLimits) -> tuple[AudioSource, ...]:
    """Every `input_audio` part, in order, checked for form and inline size."""
    found: list[AudioSource] = []
    for index, part_index, part in content_parts(request):
        if not isinstance(part, AudioPart):
            continue
        param = f"messages.{index}.content.{part_index}"
        where = f"messages[{index}].content[{part_index}]"
        host = check_source(part.input_audio.data, kind="audio", limit=limits.audio_bytes,
                            schemes=limits.url_schemes, where=where, param=param,
                            bare_base64=True)  # fmt: skip
        found.append(AudioSource(part.input_audio.data, where, param, host))
    return tuple(found)


async def audio_bytes(source: AudioSource, limits: MediaLimits) -> bytes:
    if source.host is None:
        inline = source.value.split(",", 1)[1] if source.value.startswith("data:") else source.value
        return base64.b64decode(inline, validate=True)  # checked by audio_sources
    await refuse_internal_urls([MediaUrl(source.host, source.where, source.param)],
                               limits.url_allow)  # fmt: skip
    return await _fetch(source, limits.audio_bytes)


async def _fetch(source: AudioSource, limit: int) -> bytes:
    timeout = aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            source.value, allow_redirects=False
        ) as response:
            if response.status != 200:
                raise source.refuse(f"fetching the audio URL answered HTTP {response.status}.")
            if (response.content_length or 0) > limit:
                raise source.refuse(f"the audio at the URL is over the limit of {limit} bytes.")
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise source.refuse(f"the audio at the URL is over the limit of {limit} bytes.")
            return bytes(body)
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = exc.__class__.__name__
        raise source.refuse(f"the audio URL could not be fetched ({why}).") from exc
