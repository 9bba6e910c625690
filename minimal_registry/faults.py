"""Failures to read that say nothing about the content: answered 503 and logged once per cause.

Out of file descriptors (EMFILE, ENFILE), out of memory, an I/O error, a permission that an
operator will fix: none of these means "not here". containerd takes a 404 as "not here" and
falls through to the next host (in an air gap, a DNS error); a 503 with `Retry-After` is
retried. Nothing about such a failure is ever cached: the next request tries again.

A fault is logged when it first appears, and again only after it has cleared (so a storm of
EMFILE under load is one line, not thousands); `cleared` logs that it has gone.
"""

import errno
import logging
import threading
from typing import Dict, Tuple

from minimal_registry import errors
from minimal_registry.errors import RegistryError

log = logging.getLogger("minimal_registry")

# "Not there": the path does not exist (any more). Every other errno is a fault.
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
# Faults of the process or the machine, not of one file: one cause whatever the path.
PROCESS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def is_missing(error: OSError) -> bool:
    return error.errno in MISSING_ERRNOS


class ReadFaults:
    def __init__(self):
        self._active: Dict[Tuple, int] = {}  # cause -> failures since it was logged
        self._lock = threading.Lock()  # the catalog refreshes in a thread

    def unavailable(self, error: OSError, path: str, what: str = "read") -> RegistryError:
        """Log `error` once per cause and return the 503 to answer with."""
        cause = (error.errno,) if error.errno in PROCESS_ERRNOS else (error.errno, path)
        reason = error.strerror or str(error)
        with self._lock:
            first = cause not in self._active
            self._active[cause] = self._active.get(cause, 0) + 1
        if first:
            log.error("cannot %s %s: %s; answering 503 (retry) until this clears", what, path, reason)
        return errors.unavailable(f"cannot {what} the content: {reason}")

    def cleared(self) -> None:
        """A read succeeded: the process-wide faults are over (per-file ones stay until seen)."""
        if not self._active:
            return
        with self._lock:
            over = [cause for cause in self._active if len(cause) == 1]
            counts = {cause: self._active.pop(cause) for cause in over}
        for (code,), count in counts.items():
            log.info("reads work again after %d failures (%s)", count, errno.errorcode.get(code, code))

    def cleared_path(self, path: str) -> None:
        if not self._active:
            return
        with self._lock:
            over = [cause for cause in self._active if len(cause) == 2 and cause[1] == path]
            for cause in over:
                self._active.pop(cause)
        if over:
            log.info("%s can be read again", path)
