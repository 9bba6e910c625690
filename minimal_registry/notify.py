"""systemd's sd_notify: tell the service manager we are ready, or stopping.

A no-op without $NOTIFY_SOCKET, so running by hand or in tests needs nothing. The
one-file binary runs Python in a child of its bootloader, so the unit must say
`NotifyAccess=all` or systemd drops these datagrams (and the unit never starts).
"""

import logging
import os
import socket

log = logging.getLogger("minimal_registry")


def notify(state: str, environ=None) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; True if it was sent."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # A leading @ names the Linux abstract namespace: a NUL byte, then the name.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", address, error)
        return False
