"""Where chat images may come from (gateway/media.py), with no network: a local HTTP server on
127.0.0.1 and DNS answers given by the test.

Checklist row 13: image_url to loopback, link-local, private ranges, or redirects to them;
file:// outside the allowed folder; oversized images -> 400 with `param`; remote fetch is off
by default; data: URLs work.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import os
import threading

import pytest

from splitserve.gateway.errors import RequestError
from splitserve.gateway.media import MediaPolicy, address_refusal, load_image

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
PARAM = "messages[0].content[1].image_url"


def load(url: str, policy: MediaPolicy) -> bytes:
    return asyncio.run(load_image(url, policy, PARAM))


def refused(url: str, policy: MediaPolicy, match: str) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        load(url, policy)
    assert info.value.status == 400 and info.value.param == PARAM
    return info.value


def data_url(blob: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(blob).decode()}"


def test_data_urls_work_within_the_size_cap():
    policy = MediaPolicy(max_bytes=len(PNG))
    assert load(data_url(PNG), policy) == PNG
    refused(data_url(PNG + b"x"), policy, "more than 72 bytes")
    refused(data_url(PNG * 100), policy, "more than 72 bytes")  # refused before decoding
    refused("data:image/png;base64,@@@@", policy, "not valid base64")
    refused("data:image/png,rawbytes", policy, "only base64")
    refused(data_url(PNG, "text/html"), policy, "not an image")
    refused("gopher://x/y", policy, "unsupported image URL scheme 'gopher'")


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("::ffff:10.0.0.1", "private"),
        ("fd00::1", "private"),  # unique local
        ("2002:7f00:1::1", "tunnelled"),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    assert kind in address_refusal(address)


def test_public_addresses_pass():
    assert address_refusal("93.184.216.34") is None
    assert address_refusal("2606:2800:220:1:248:1893:25c8:1946") is None


def test_remote_fetch_is_off_by_default():
    refused("http://example.com/cat.png", MediaPolicy(), "no --allowed-media-domains")


def test_host_must_be_allowed_and_resolve_to_public_addresses():
    async def dns(host, port):
        return {"meta.test": ["169.254.169.254"], "mixed.test": ["93.184.216.34", "10.0.0.1"]}[host]

    policy = MediaPolicy(allowed_domains=frozenset({"meta.test", "mixed.test"}), resolver=dns)
    refused("http://other.test/x.png", policy, "'other.test' is not in --allowed-media-domains")
    refused("http://meta.test/latest", policy, "link-local")
    refused("https://mixed.test/x.png", policy, "10.0.0.1 is a private")  # any bad answer


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    stall = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        route = self.routes.get(self.path)
        if route == "stall":
            _Handler.stall.wait(10)
            return
        if route is None:
            self.send_response(404)
            self.end_headers()
            return
        status, headers, body = route
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        _Handler.hosts.append(self.headers.get("Host"))

    hosts: list = []

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]
    _Handler.routes = {
        "/cat.png": (200, {}, PNG),
        "/big.png": (200, {}, PNG * 10),
        "/to-internal": (302, {"Location": f"http://internal.test:{port}/cat.png"}, b""),
        "/to-other": (302, {"Location": f"http://other.test:{port}/cat.png"}, b""),
        "/to-self": (302, {"Location": "/cat.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/slow": "stall",
    }
    _Handler.hosts = []
    _Handler.stall.clear()
    yield port
    _Handler.stall.set()
    srv.shutdown()
    srv.server_close()


def test_loopback_is_refused_even_for_an_allowed_domain(server):
    """A real server on 127.0.0.1 and the real resolver: 'localhost' is allowed by name, yet
    refused for its address; nothing reaches the server."""
    policy = MediaPolicy(allowed_domains=frozenset({"localhost"}))
    refused(f"http://localhost:{server}/cat.png", policy, "loopback")
    assert _Handler.hosts == []


def _lab_policy(**kw) -> MediaPolicy:
    """img.test and internal.test resolve to the loopback server; only internal.test's answer
    counts as private (the test's stand-in for a public host that redirects inwards)."""

    async def dns(host, port):
        return {"img.test": ["127.0.0.1"], "internal.test": ["10.9.9.9"]}[host]

    def check(address):
        return None if address == "127.0.0.1" else address_refusal(address)

    domains = frozenset({"img.test", "internal.test"})
    return MediaPolicy(allowed_domains=domains, resolver=dns, check_address=check, **kw)


def test_fetch_follows_checked_redirects_only(server):
    policy = _lab_policy(max_bytes=len(PNG) * 2)
    assert load(f"http://img.test:{server}/cat.png", policy) == PNG
    assert _Handler.hosts == [f"img.test:{server}"]  # pinned address, the URL's host
    assert load(f"http://img.test:{server}/to-self", policy) == PNG
    refused(f"http://img.test:{server}/to-internal", policy, "10.9.9.9 is a private")
    refused(f"http://img.test:{server}/to-other", policy, "'other.test' is not in")
    refused(f"http://img.test:{server}/loop", policy, "more than 3 redirects")
    refused(f"http://img.test:{server}/missing.png", policy, "HTTP 404")
    refused(f"http://img.test:{server}/big.png", policy, "more than 144 bytes")


def test_fetch_timeout_is_bounded(server):
    refused(f"http://img.test:{server}/slow", _lab_policy(timeout_s=0.3), "longer than 0.3 s")


def test_local_files_only_inside_the_allowed_folder(tmp_path):
    root, outside = tmp_path / "media", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "cat.png").write_bytes(PNG)
    (outside / "key.png").write_bytes(PNG)
    os.symlink(outside / "key.png", root / "link.png")
    refused(f"file://{root}/cat.png", MediaPolicy(), "no --allowed-local-media-path")
    policy = MediaPolicy(local_root=root.resolve(), max_bytes=len(PNG))
    assert load(f"file://{root}/cat.png", policy) == PNG
    refused(f"file://{outside}/key.png", policy, "outside --allowed-local-media-path")
    refused(f"file://{root}/../secret/key.png", policy, "outside")
    refused(f"file://{root}/link.png", policy, "outside")  # the symlink is followed
    refused(f"file://{root}/none.png", policy, "no such image file")
    refused(f"file://evil.host{root}/cat.png", policy, "may not name a host")
    (root / "big.png").write_bytes(PNG * 2)
    refused(f"file://{root}/big.png", policy, "more than 72 bytes")


def test_chat_images_are_counted_before_fetching_and_bounded_together(monkeypatch):
    from types import SimpleNamespace

    from splitserve.gateway import prepare

    config = SimpleNamespace(
        limit_mm_per_prompt='{"image":2}',
        allowed_media_domains=None,
        allowed_local_media_path=None,
        max_image_bytes=1000,
        media_fetch_timeout_s=1.0,
    )
    urls = [(data_url(PNG), f"messages[0].content[{j}].image_url") for j in range(3)]
    with pytest.raises(RequestError, match="3 images, more than the limit of 2") as info:
        asyncio.run(prepare._load_images(urls, config))
    assert info.value.param == "messages"
    assert asyncio.run(prepare._load_images(urls[:2], config)) == [PNG, PNG]
    monkeypatch.setattr(prepare, "_MAX_TOTAL_IMAGE_BYTES", len(PNG) + 1)
    with pytest.raises(RequestError, match="144 bytes together"):
        asyncio.run(prepare._load_images(urls[:2], config))
    # Remote fetch refused on the part itself, even before any network is touched.
    remote = [("http://example.com/a.png", "messages[1].content[0].image_url")]
    with pytest.raises(RequestError, match="fetching images over http") as info:
        asyncio.run(prepare._load_images(remote, config))
    assert info.value.param == "messages[1].content[0].image_url"
