#!/usr/bin/env bash
#
# Soak test: a real minimal-registry on 127.0.0.1 under a mix of requests from 200 clients
# at once while its tree changes, every answer checked byte for byte (scripts/soak.py says
# how). Prints requests/s, the answers per kind, the server's file descriptors and RSS at
# start and end, and one line per kind of violation; exits 1 on any violation.
# Memory: RSS may grow by at most 5 MiB from the end of warm-up (a third of the run, at
# least 20 s, at most 60 s; the allocator's high water for the clients is reached by then)
# to the end: a leak keeps growing, high water does not. A run of 20 s or less checks no RSS.
#
# Usage: scripts/soak.sh [--duration SECONDS] [--concurrency N] [--no-fault] [--keep] [--seed N]
#
#   --duration SECONDS  length of the load (default 300)
#   --concurrency N     clients at once (default 200)
#   --no-fault          do not lower the server's open-file limit midway (no 503 allowed)
#   --keep              keep the work directory: the tree and the server's log
#   --seed N            the same request mix again (printed at start; timing still varies)
#
# Environment:
#   MINIMAL_REGISTRY_BIN  a built binary to soak instead of the source tree
#   PYTHON                the Python with gevent (default: .venv/bin/python, else python3)
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fatal() {
    printf '[ERROR] %s\n' "$*" >&2
    exit 2
}

main() {
    case "${1:-}" in
        -h|--help) sed -n '3,/^set -o/{/^set -o/d;s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    esac
    local python="${PYTHON:-}"
    if [[ -z "${python}" ]]; then
        if [[ -x "${ROOT}/.venv/bin/python" ]]; then python="${ROOT}/.venv/bin/python"; else python=python3; fi
    fi
    "${python}" -c 'import gevent' 2>/dev/null ||
        fatal "${python} has no gevent (make the venv: python3 -m venv .venv && .venv/bin/pip install -e .)"
    exec "${python}" "${ROOT}/scripts/soak.py" "$@"
}

main "$@"
