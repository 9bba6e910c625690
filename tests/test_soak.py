"""The soak's checks (scripts/soak.py) catch what they exist to catch: each is fed a wrong
answer, as a broken server would give it, and must report it. The soak itself runs from
scripts/soak.sh (30 s in .ci/run); here no server runs."""

import hashlib
import importlib.util
import time

import pytest

from serverproc import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("soak", PROJECT_ROOT / "scripts/soak.py")
soak_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak_module)
Answer = soak_module.Answer


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return soak_module.build_tree(tmp_path_factory.mktemp("soak") / "registry")


@pytest.fixture
def soak(plan):
    checker = soak_module.Soak(plan, ("127.0.0.1", 1), duration=1, concurrency=1)
    checker.started = time.monotonic()
    return checker


class CannedClient:
    """Answers every request with what `answer(method, path, headers)` returns."""

    def __init__(self, answer):
        self.answer = answer

    def request(self, method, path, headers=(), raw=None, read_limit=None):
        return self.answer(method, path, dict(headers))


def manifest_answer(plan, digest, body=None, headers=None):
    item = plan["manifests"][digest]
    data = item["data"].encode() if body is None else body
    answer_headers = {"docker-content-digest": digest, "content-length": str(len(item["data"].encode())),
                      "content-type": item["media_type"]}
    answer_headers.update(headers or {})
    return Answer(200, answer_headers, data, 0.0)


def flipped_tag(plan):
    return next(t for t in plan["tags"].values() if len(t["digests"]) > 1)


def test_a_tag_answered_right_is_no_violation(soak, plan):
    tag = flipped_tag(plan)
    soak.tags = [tag]
    soak.manifest_by_tag(CannedClient(lambda *_: manifest_answer(plan, tag["digests"][1])))
    assert not soak.violations


def test_a_tag_body_that_is_not_its_digest_is_wrong_bytes(soak, plan):
    tag = flipped_tag(plan)
    soak.tags = [tag]
    old, new = tag["digests"]
    # The old digest in the header, the new manifest's bytes in the body: a torn re-point.
    soak.manifest_by_tag(CannedClient(lambda *_: manifest_answer(plan, old, body=plan["manifests"][new]["data"].encode())))
    assert "wrong bytes" in soak.violations


def test_a_tag_naming_a_digest_it_never_pointed_to_is_reported(soak, plan):
    tag = next(t for t in plan["tags"].values() if len(t["digests"]) == 1)
    soak.tags = [tag]
    other = next(d for d in plan["manifests"] if d not in tag["digests"])
    soak.manifest_by_tag(CannedClient(lambda *_: manifest_answer(plan, other)))
    assert "wrong digest for a tag" in soak.violations


def test_a_404_for_a_tag_that_exists_is_reported(soak, plan):
    soak.tags = [flipped_tag(plan)]
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"stored manifest is corrupt"}]}'
    soak.manifest_by_tag(CannedClient(lambda *_: Answer(404, {"content-length": str(len(body))}, body, 0.0)))
    assert list(soak.violations) == ["wrong status (404 for 200)"]


def test_a_range_with_one_byte_wrong_is_wrong_bytes(soak, plan):
    def one_byte_flipped(method, path, headers):
        digest = path.split("/blobs/", 1)[1].split("?")[0]
        data = soak.blob_bytes[digest]
        first, last = headers["Range"][len("bytes="):].split("-")
        first, last = int(first), int(last) if last else len(data) - 1
        body = bytes([data[first] ^ 1]) + data[first + 1:last + 1]
        return Answer(206, {"content-range": f"bytes {first}-{last}/{len(data)}"}, body, 0.0)

    soak.blob_range(CannedClient(one_byte_flipped))
    assert list(soak.violations) == ["wrong bytes"]


def test_a_503_is_allowed_only_inside_an_injected_fault(soak, plan):
    unavailable = Answer(503, {"retry-after": "1"}, b'{"errors":[{"code":"UNAVAILABLE"}]}', 0.0)
    soak.blob(CannedClient(lambda *_: unavailable))
    assert "5xx" in soak.violations
    soak.violations.clear()
    now = time.monotonic()
    soak.fault_windows.append((now - 1, now + 1))
    soak.blob(CannedClient(lambda *_: unavailable))
    assert not soak.violations and soak.allowed_503 == 1


def test_the_server_log_calling_a_valid_manifest_corrupt_is_reported(soak):
    line = ("2026-11-30 07:50:20,709 minimal-registry ERROR refusing /tree/soak/alpha/manifests/sha256:aa: "
            "stored as sha256:aa but its sha256 is sha256:bb")
    traceback = ("Traceback (most recent call last):\n  File \"gevent/server.py\", line 190, in do_read\n"
                 "OSError: [Errno 24] Too many open files\n")
    soak_module.log_problems(soak, line + "\n" + traceback, time.time())
    assert set(soak.violations) == {"ERROR in the server log calling a valid file corrupt", "traceback in the server log"}
    assert "Too many open files" in soak.violations["traceback in the server log"][0]


def test_the_tree_holds_what_the_plan_says(plan):
    for digest, blob in plan["blobs"].items():
        with open(blob["path"], "rb") as file:
            assert "sha256:" + hashlib.sha256(file.read()).hexdigest() == digest
    sizes = sorted(blob["size"] for blob in plan["blobs"].values())
    assert sizes[0] < 4096 and sizes[-1] > 4 * 1024 * 1024


def rss_series(mib_by_second):
    """(time, RSS) samples as the soak takes them, from {second: MiB}."""
    return [(at, mib * soak_module.MIB) for at, mib in sorted(mib_by_second.items())]


def test_rss_that_keeps_growing_after_warm_up_is_a_leak():
    # The server before its manifest reads were sized to the file: 150 s, warm-up ends at 50 s.
    leak = rss_series({14: 43, 29: 51, 43: 54, 50: 55, 57: 57, 71: 61, 86: 63, 100: 64, 115: 65, 129: 65, 144: 65})
    assert soak_module.rss_grew(leak, 50, 65 * soak_module.MIB)


def test_rss_that_rose_to_its_high_water_during_warm_up_and_stayed_is_no_leak():
    # The same soak after the fix (120 s, warm-up ends at 40 s).
    high_water = rss_series({11: 35, 23: 41, 34: 41, 40: 41.5, 57: 41, 80: 42, 102: 42, 114: 43})
    assert not soak_module.rss_grew(high_water, 40, 42.2 * soak_module.MIB)


def test_a_run_that_ends_before_warm_up_does_is_not_judged_on_memory():
    assert not soak_module.rss_grew(rss_series({5: 30, 10: 60}), 20, 90 * soak_module.MIB)
