"""Refuses media URLs that point inside the network (server-side request forgery).

mimoserve never fetches a client's URL, but the engines it relays to do (vLLM fetches
`image_url`s): a URL naming loopback, a private or link-local address (cloud metadata
at 169.254.169.254) would make the engine fetch it from inside the network. Every
address the host resolves to must be globally routable, unless the operator allows the
host or its network (`--media-url-allow`). The engine resolves the name again when it
fetches, so a name whose answers change in between (DNS rebinding) is beyond this
check; engines that can, should also be run without access to internal networks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from mimoserve.errors import InvalidRequestError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class MediaUrl:
    host: str
    where: str  # "messages[0].content[1]"
    param: str


@dataclass(frozen=True)
class UrlAllowList:
    hosts: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> UrlAllowList:
        """Host names and networks (`10.0.0.0/8`, `192.168.1.7`), as operators write them."""
        hosts: set[str] = set()
        networks: list[IpNetwork] = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, address: IpAddress) -> bool:
        return any(address in network for network in self.networks)


def _public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def _addresses(host: str) -> list[IpAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM), _RESOLVE_TIMEOUT_S
    )
    # Scoped IPv6 addresses come back as "fe80::1%eth0".
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def refuse_internal_urls(urls: Iterable[MediaUrl], allow: UrlAllowList) -> None:
    for url in urls:
        host = url.host.lower().rstrip(".")
        if host in allow.hosts:
            continue

        def refuse(why: str, url: MediaUrl = url) -> InvalidRequestError:
            return InvalidRequestError(f"{url.where}: {why}", param=url.param,
                                       code="invalid_media")  # fmt: skip

        try:
            addresses = await _addresses(host)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            raise refuse(f"the URL's host {url.host!r} cannot be resolved.") from exc
        if not addresses:
            raise refuse(f"the URL's host {url.host!r} cannot be resolved.")
        for address in addresses:
            if not _public(address) and not allow.allows(address):
                raise refuse(
                    "the URL points at a loopback, private, link-local or reserved address; "
                    "send the data inline as a data URL."
                )
