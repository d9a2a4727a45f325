"""CHECKLIST row 29: with two pipeline ranks, every socket any splitserve process listens on
is on the loopback address it was told to use: the gateway, the gRPC services, rank 0's
rendezvous store (torch's own tcp:// rendezvous listened on every interface) and gloo's
connections between the ranks. Read from /proc, so no `ss` is needed.

The check runs on the two-rank stack of test_lifecycle.py (its pp2 case, before it kills a
rank) rather than on a stack of its own: `assert_every_listening_socket_is_on_loopback`."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import sys

import httpx
import pytest

from .conftest import Server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/net")

LISTEN = "0A"


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc prints IPv6 as four host-order 32-bit words.
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` holds in the LISTEN state."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                hex_addr, hex_port = local.split(":")
                found.append((str(_address(hex_addr)), int(hex_port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def assert_every_listening_socket_is_on_loopback(s: Server) -> None:
    """On a healthy stack of two pipeline ranks."""
    assert len(s.children) == 5  # tokenizer, two workers, scheduler, gateway
    # A request crosses both ranks, so gloo's pair connections exist.
    body = {"model": s.model, "prompt": "hi", "max_tokens": 4}
    assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
    seen = {pid: listening_sockets(pid) for pid in [s.proc.pid, *s.children]}
    everything = [sock for socks in seen.values() for sock in socks]
    assert any(port == s.port for _, port in everything), seen
    assert len(everything) >= 5, seen  # each service's own port at least, and the store
    outside = {pid: [a for a in socks if not is_loopback(a[0])] for pid, socks in seen.items()}
    assert not any(outside.values()), f"listening beyond loopback: {outside}"


def test_addresses_read_from_proc_and_what_counts_as_loopback():
    assert _address("0100007F") == ipaddress.IPv4Address("127.0.0.1")
    assert _address("00000000") == ipaddress.IPv4Address("0.0.0.0")
    assert _address("00000000000000000000000001000000") == ipaddress.IPv6Address("::1")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("::ffff:10.0.0.1")
