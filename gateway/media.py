"""Fetching the images of chat `image_url` parts and the audio of `audio_url` parts, with the
server's rules on where from (one policy per kind of media, `MediaPolicy.kind`).

- `data:` URLs (base64) always work, up to `max_bytes` decoded (--max-image-bytes for images,
  25 MB for audio, OpenAI's upload limit).
- `http(s)://` is off unless `--allowed-media-domains` names the URL's host. Even then the
  host's addresses must all be public: loopback, private, link-local, unspecified, multicast,
  reserved and shared ranges (IPv4 and IPv6, IPv4-mapped IPv6 read as IPv4) are refused. The
  connection goes to the address that was checked (the URL's host stays in the Host header
  and TLS server name), so a second DNS answer cannot swap in another. Redirects are followed
  by hand, at most `_MAX_REDIRECTS`, each hop checked like the first. The whole fetch has
  one timeout and the body a size cap.
- `file://` only inside `--allowed-local-media-path`, after following symlinks.

Every refusal is a 400 naming the content part (`param`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import os
import pathlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from splitserve.gateway.errors import bad_request

_MAX_REDIRECTS = 3
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({info[4][0] for info in infos})


def address_refusal(address: str) -> str | None:
    """Why a fetch may not go to `address`, or None when it is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None or ip.teredo is not None:
            return f"{address} is a tunnelled (6to4 / Teredo) address"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


@dataclass
class MediaPolicy:
    """Where images may come from and how big they may be (from GatewayConfig)."""

    allowed_domains: frozenset[str] = frozenset()
    """Hosts http(s) images may be fetched from; empty: no remote fetch."""
    local_root: pathlib.Path | None = None
    """Folder file:// images may be read from (resolved); None: no local files."""
    max_bytes: int = 10 << 20
    timeout_s: float = 5.0
    resolver: Resolver = resolve_host
    """host, port -> addresses (tests answer for DNS)."""
    check_address: Callable[[str], str | None] = address_refusal
    """address -> why it is refused, or None."""
    kind: str = "image"
    """What is fetched ("image" or "audio"): the data: URL media type, and the messages."""
    size_limit: str = "--max-image-bytes"
    """Where `max_bytes` comes from, for the message past it."""

    @classmethod
    def from_config(cls, config) -> MediaPolicy:
        root = config.allowed_local_media_path
        return cls(
            allowed_domains=frozenset(d.lower() for d in (config.allowed_media_domains or [])),
            local_root=pathlib.Path(os.path.realpath(root)) if root else None,
            max_bytes=config.max_image_bytes,
            timeout_s=config.media_fetch_timeout_s,
        )


AUDIO_MAX_BYTES = 25 * 1024 * 1024
"""Largest audio file a chat part may carry (OpenAI's upload limit)."""


def audio_policy(policy: MediaPolicy) -> MediaPolicy:
    """`policy`'s rules on where from, for audio files."""
    return dataclasses.replace(
        policy, kind="audio", max_bytes=AUDIO_MAX_BYTES, size_limit="OpenAI's 25 MB upload limit"
    )


async def load_image(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The bytes of the image (or, with an audio policy, the audio file) at `url`; a 400
    (RequestError) naming `param` when refused."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: the {policy.kind} URL must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url, policy, param)
    if scheme == "file":
        return await _read_local(url, policy, param)
    if scheme in ("http", "https"):
        try:
            return await asyncio.wait_for(_fetch(url, policy, param), policy.timeout_s)
        except TimeoutError:
            raise bad_request(
                f"{param}: fetching the {policy.kind} took longer than {policy.timeout_s:g} s",
                param,
            ) from None
    raise bad_request(
        f"{param}: unsupported {policy.kind} URL scheme {scheme!r}; use a data: URL (base64)", param
    )


def _decode_data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: a data: URL needs a ',' before its data", param)
    parts = header.split(";")
    if "base64" not in parts[1:]:
        raise bad_request(f"{param}: only base64 data: URLs are supported", param)
    if parts[0] and not parts[0].lower().startswith(policy.kind + "/"):
        article = "an" if policy.kind[0] in "aeiou" else "a"
        raise bad_request(
            f"{param}: the data: URL holds {parts[0]!r}, not {article} {policy.kind}", param
        )
    return decode_base64(payload, policy, param, "the data: URL")


def decode_base64(payload: str, policy: MediaPolicy, param: str, what: str = "the data") -> bytes:
    """Base64 `payload` decoded, within `policy.max_bytes`; a 400 naming `param` otherwise."""
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise bad_request(_too_big(param, policy, what), param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: {what} is not valid base64: {exc}", param) from None
    if len(data) > policy.max_bytes:
        raise bad_request(_too_big(param, policy, what), param)
    return data


def _plural(kind: str) -> str:
    return "images" if kind == "image" else kind


def _too_big(param: str, policy: MediaPolicy, what: str) -> str:
    return f"{param}: {what} holds more than {policy.max_bytes} bytes ({policy.size_limit})"


async def _read_local(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.local_root is None:
        raise bad_request(
            f"{param}: file:// {_plural(policy.kind)} are refused: this server has no "
            "--allowed-local-media-path",
            param,
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{param}: a file:// URL may not name a host", param)
    path = pathlib.Path(os.path.realpath(unquote(parts.path)))
    if not path.is_relative_to(policy.local_root):
        raise bad_request(f"{param}: the file is outside --allowed-local-media-path", param)

    def read() -> bytes:
        if not path.is_file():
            raise bad_request(f"{param}: no such {policy.kind} file", param)
        if path.stat().st_size > policy.max_bytes:
            raise bad_request(_too_big(param, policy, "the file"), param)
        return path.read_bytes()

    return await asyncio.get_running_loop().run_in_executor(None, read)


async def _checked_address(url: str, policy: MediaPolicy, param: str) -> tuple[str, int, str]:
    """(host, port, the checked address to connect to) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise bad_request(f"{param}: a redirect led to a {parts.scheme!r} URL", param)
    host = (parts.hostname or "").lower()
    if not policy.allowed_domains:
        raise bad_request(
            f"{param}: fetching {_plural(policy.kind)} over http(s) is off: this server has no "
            f"--allowed-media-domains (send the {policy.kind} as a data: URL)",
            param,
        )
    if host not in policy.allowed_domains:
        raise bad_request(f"{param}: the host {host!r} is not in --allowed-media-domains", param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = await policy.resolver(host, port)
    except OSError as exc:
        raise bad_request(f"{param}: the host {host!r} does not resolve: {exc}", param) from None
    if not addresses:
        raise bad_request(f"{param}: the host {host!r} does not resolve", param)
    for address in addresses:
        why = policy.check_address(address)
        if why is not None:
            raise bad_request(f"{param}: the host {host!r} is refused: {why}", param)
    return host, port, addresses[0]


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            host, port, address = await _checked_address(url, policy, param)
            parts = urlsplit(url)
            literal = f"[{address}]" if ":" in address else address
            pinned = parts._replace(netloc=f"{literal}:{port}").geturl()
            default_port = port == (443 if parts.scheme == "https" else 80)
            headers = {"Host": host if default_port else f"{host}:{port}"}
            extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
            try:
                body = await _get(client, pinned, headers, extensions, policy, param)
            except httpx.HTTPError as exc:
                raise bad_request(
                    f"{param}: fetching the {policy.kind} failed: {type(exc).__name__}: {exc}",
                    param,
                ) from None
            if isinstance(body, bytes):
                return body
            url = urljoin(url, body)
    raise bad_request(f"{param}: more than {_MAX_REDIRECTS} redirects", param)


async def _get(client, url, headers, extensions, policy: MediaPolicy, param: str) -> bytes | str:
    """The body (bytes), or the Location of a redirect (str)."""
    async with client.stream("GET", url, headers=headers, extensions=extensions) as resp:
        if resp.is_redirect:
            location = resp.headers.get("location")
            if not location:
                raise bad_request(f"{param}: a redirect without a Location", param)
            return location
        if resp.status_code != 200:
            raise bad_request(
                f"{param}: fetching the {policy.kind} returned HTTP {resp.status_code}", param
            )
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise bad_request(_too_big(param, policy, f"the fetched {policy.kind}"), param)
        return bytes(body)
