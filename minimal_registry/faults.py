"""Failures to read that say nothing about the content: answered 503 and logged once per cause.

Out of file descriptors (EMFILE, ENFILE), out of memory, an I/O error, a permission that an
operator will fix: none of these means "not here". containerd takes a 404 as "not here" and
falls through to the next host (in an air gap, a DNS error); a 503 with `Retry-After` is
retried. Nothing about such a failure is ever cached: the next request tries again.

A fault is logged when it first appears, and again only after it has cleared (so a storm of
EMFILE under load is one line, not thousands); `cleared` logs, once, that it has gone.
"""

import errno
import logging
import threading
import time
from typing import Dict, Tuple

from minimal_registry import errors
from minimal_registry.errors import RegistryError

log = logging.getLogger("minimal_registry")

# "Not there": the path does not exist (any more). Every other errno is a fault.
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
# "Broken here": the tree holds something unusable at this path (a loop of links, a name too
# long to resolve). A verdict on the tree, not a passing fault: refused like a FIFO would be.
BROKEN_ERRNOS = frozenset({errno.ELOOP, errno.ENAMETOOLONG, errno.EISDIR, errno.ENXIO, errno.ENODEV})
# Faults of the process or the machine, not of one file: one cause whatever the path.
PROCESS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def is_missing(error: OSError) -> bool:
    return error.errno in MISSING_ERRNOS


def is_broken(error: OSError) -> bool:
    return error.errno in BROKEN_ERRNOS


# A fault counts as over once reads have worked for this long after its last failure: under
# fd pressure, failures and successes alternate, and that is one episode, one log line.
QUIET_SECONDS = 5.0


class ReadFaults:
    def __init__(self):
        self._active: Dict[Tuple, list] = {}  # cause -> [failures, monotonic time of the last]
        self._lock = threading.Lock()  # the catalog refreshes in a thread

    def unavailable(self, error: OSError, path: str, what: str = "read") -> RegistryError:
        """Log `error` once per cause and return the 503 to answer with."""
        cause = (error.errno,) if error.errno in PROCESS_ERRNOS else (error.errno, path)
        reason = error.strerror or str(error)
        with self._lock:
            record = self._active.get(cause)
            first = record is None
            if first:
                record = self._active[cause] = [0, 0.0]
            record[0] += 1
            record[1] = time.monotonic()
        if first:
            log.error("cannot %s %s: %s; answering 503 (retry) until this clears", what, path, reason)
        return errors.unavailable(f"cannot {what} the content: {reason}")

    def cleared(self, path: str) -> None:
        """A read of `path` worked: faults quiet for QUIET_SECONDS (and this path's) are over."""
        if not self._active:
            return
        now = time.monotonic()
        with self._lock:
            over = [cause for cause, (_count, last) in self._active.items()
                    if (len(cause) == 2 and cause[1] == path) or now - last >= QUIET_SECONDS]
            counts = {cause: self._active.pop(cause)[0] for cause in over}
        for cause, count in counts.items():
            what = cause[1] if len(cause) == 2 else "the content"
            log.info("%s can be read again, after %d failures (%s)", what, count,
                     errno.errorcode.get(cause[0], cause[0]))
