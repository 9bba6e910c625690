"""`--workers N`: N processes serve the same bound sockets; the parent supervises them,
tells systemd READY=1 once all of them listen, forwards SIGTERM and replaces a worker that
dies."""

import os
import signal
import subprocess
import time

from httpraw import request
from notifysocket import bind_notify_socket
from serverproc import start_registry


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def supervisor_pid(process, workers):
    """The process whose children are the `workers` worker processes."""
    pid = process.pid
    for _ in range(4):
        kids = children(pid)
        if len(kids) == workers:
            return pid
        if len(kids) != 1:
            break
        pid = kids[0]
    raise AssertionError(f"no process with {workers} workers under {process.pid}")


def receive_states(sock, count, timeout=20.0):
    sock.settimeout(timeout)
    return [sock.recv(4096).decode() for _ in range(count)]


def test_two_workers_serve_announce_once_and_stop_together(small_tree, tmp_path):
    notify_sock, address = bind_notify_socket(tmp_path, abstract=False)
    with notify_sock:
        registry = start_registry(small_tree.root, "--workers", "2", env={"NOTIFY_SOCKET": address})
        try:
            assert receive_states(notify_sock, 1) == ["READY=1"]
            start_up = [line for line in registry.log().splitlines() if "listening on" in line]
            assert len(start_up) == 1 and "(2 worker processes, each up to 1000 connections)" in start_up[0]
            parent = supervisor_pid(registry.process, 2)
            workers = children(parent)
            assert len(workers) == 2
            for _ in range(20):
                assert request(registry, "GET", "/v2/library/hello/manifests/latest")[0] == 200
            assert registry.stop(signal.SIGTERM) == 0
            assert receive_states(notify_sock, 1) == ["STOPPING=1"]
            for pid in workers:
                assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
            assert "Traceback" not in registry.log()
        finally:
            registry.stop()


def test_a_worker_that_dies_is_replaced(small_tree):
    registry = start_registry(small_tree.root, "--workers", "2")
    try:
        parent = supervisor_pid(registry.process, 2)
        first, second = children(parent)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = children(parent)
            if len(now) == 2 and first not in now:
                break
            time.sleep(0.1)
        now = children(parent)
        assert len(now) == 2 and first not in now and second in now
        assert f"worker 1 (pid {first}) ended unexpectedly (signal 9): starting another" in registry.log()
        for _ in range(10):
            assert request(registry, "GET", "/v2/")[0] == 200
        assert registry.stop(signal.SIGTERM) == 0
    finally:
        registry.stop()

