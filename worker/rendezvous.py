"""Where the pipeline ranks meet: rank 0's rendezvous store, bound to the master address only.

torch's own `tcp://` rendezvous has rank 0's `TCPStore` listen on every interface (IPv4 and
IPv6) for the life of the process group, whatever host the URL names, and the store has no
authentication. Here rank 0 binds the listening socket itself, to the master address of
`WorkerConfig.init_method()`, and hands it to the store (`master_listen_fd`), so the store is
reachable exactly where it was told to be: loopback for a single-host stack.

gloo's own connections between ranks listen on the address of the device it picks: with
`GLOO_SOCKET_IFNAME` unset it resolves the host name, which can be a public interface. When
the master address is a loopback address every rank runs on this host, so the ranks' gloo
device is put on the interface holding that address. On several hosts, open the master port
on rank 0's host and set `GLOO_SOCKET_IFNAME` (NCCL: `NCCL_SOCKET_IFNAME`) on every host to the
interface the ranks share; the README's pipeline section says the same.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from datetime import timedelta
from urllib.parse import urlsplit

import torch.distributed as dist

logger = logging.getLogger(__name__)


def tcp_endpoint(init_method: str) -> tuple[str, int] | None:
    """(host, port) of a `tcp://host:port` rendezvous URL; None for other schemes (env://,
    file://), which torch handles itself."""
    parts = urlsplit(init_method)
    if parts.scheme != "tcp":
        return None
    if not parts.hostname or parts.port is None:
        raise ValueError(f"the rendezvous URL {init_method!r} needs a host and a port")
    return parts.hostname, parts.port


def _resolved(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return ipaddress.ip_address(info[0][4][0])


def loopback_interface(host: str) -> str | None:
    """Name of this host's interface holding `host`'s address when that address is a loopback
    one; None otherwise (or when no interface holds it)."""
    import psutil

    address = _resolved(host)
    if not address.is_loopback:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == address:
                        return name
                except ValueError:
                    continue
    return None


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening; OSError naming both when taken."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for the rendezvous store: {exc}") from exc
    return sock


class Rendezvous:
    """The store this rank joins the group through. Rank 0 owns the listening socket and must
    keep this object alive as long as the group (the store serves through it)."""

    def __init__(self, init_method: str, rank: int, world_size: int, timeout: timedelta):
        self.init_method = init_method
        self._socket: socket.socket | None = None
        self.store: dist.TCPStore | None = None
        endpoint = tcp_endpoint(init_method)
        if endpoint is None:
            return
        host, port = endpoint
        interface = loopback_interface(host)
        if interface is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            # NOTE: read by gloo when the process group is created, right after this.
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        if rank == 0:
            self._socket = _listening_socket(host, port)
            self.store = dist.TCPStore(
                host,
                port,
                world_size,
                True,
                timeout,
                wait_for_workers=False,
                master_listen_fd=self._socket.fileno(),
            )
        else:
            self.store = dist.TCPStore(host, port, world_size, False, timeout)

    def join_kwargs(self) -> dict:
        """`init_process_group` arguments: the store when this module made one, else the URL."""
        if self.store is None:
            return {"init_method": self.init_method}
        return {"store": self.store}

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
