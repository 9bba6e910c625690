"""A socket standing in for systemd's $NOTIFY_SOCKET, by path or in the abstract namespace."""

import os
import socket
import time
from pathlib import Path
from typing import Tuple


def bind_notify_socket(directory: Path, abstract: bool) -> Tuple[socket.socket, str]:
    """(the listening datagram socket, the value for NOTIFY_SOCKET)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"minimal-registry-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(Path(directory) / "notify.sock")
    sock.bind(path)
    return sock, path
