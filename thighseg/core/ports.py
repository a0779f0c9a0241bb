"""Free TCP ports for the servers that tests and the benchmark start on localhost.

Binding port 0 hands out a port from the kernel's ephemeral range, the same range that outgoing
connections draw from: between choosing a port and the server binding it, a client connection
(to Triton, to a PACS) can take it, and the server then fails with "Address already in use" (seen
once in CI). Ports below the ephemeral range are never given to outgoing connections, so they are
chosen there, each at most once per process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # above the ports services commonly listen on
_handed_out: set[int] = set()


def _below_ephemeral() -> range:
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(LOWEST, low)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now and no outgoing connection will take."""
    candidates = _below_ephemeral()
    for _ in range(200 if len(candidates) > 1000 else 0):
        port = random.choice(candidates)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
