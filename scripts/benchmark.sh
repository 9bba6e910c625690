#!/usr/bin/env bash
#
# Side-by-side benchmark: minimal-registry against nginx serving the same content tree as
# static files, on 127.0.0.1 only, with wrk. Prints each figure and the ratio
# minimal-registry / nginx; nginx is the reference, so a ratio near 1 is as fast as nginx.
#
# Usage: scripts/benchmark.sh [-d SECONDS] [-c CONNECTIONS]
#
#   -d SECONDS      length of each wrk run (default 10)
#   -c CONNECTIONS  concurrent connections per run (default 16)
#
# Environment:
#   MINIMAL_REGISTRY_BIN  a built binary to measure instead of `python3 -m minimal_registry`
#   PYTHON                the Python that runs the source tree (default: python3)
#
# Needs: wrk, nginx, curl (Debian packages of those names). Both servers get one CPU core
# each way: nginx runs one worker process, minimal-registry is one process.
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION=10
CONNECTIONS=16
START_RUNS=11
PYTHON="${PYTHON:-python3}"

info() { echo "[benchmark] $*" >&2; }
fatal() { echo "[benchmark] error: $*" >&2; exit 1; }

parse_args() {
  while (($# > 0)); do
    case "$1" in
      -d) DURATION="$2"; shift 2 ;;
      -c) CONNECTIONS="$2"; shift 2 ;;
      -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) fatal "unknown argument $1 (see -h)" ;;
    esac
  done
}

check_tools() {
  local tool
  for tool in wrk nginx curl; do
    command -v "${tool}" >/dev/null || fatal "${tool} is not installed (apt-get install ${tool})"
  done
}

cleanup() {
  if [[ -n "${REGISTRY_PID:-}" ]]; then kill "${REGISTRY_PID}" 2>/dev/null || true; fi
  if [[ -n "${NGINX_PID:-}" ]]; then kill "${NGINX_PID}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  rm -rf "${WORK}"
}

free_port() {
  "${PYTHON}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

build_tree() {
  info "building a content tree (a small image and a 64 MiB blob)"
  PYTHONPATH="${ROOT}/tests" "${PYTHON}" - "${WORK}/registry" >"${WORK}/refs" <<'PY'
import sys
from pathlib import Path
from imagetree import TreeBuilder
builder = TreeBuilder(Path(sys.argv[1]))
small = builder.image("library/hello", "latest", files={"hello.txt": b"hello\n"})
big = builder.image("big/blob", "latest", layer_bytes=64 * 1024 * 1024)
print(small.digest, small.layers[0].digest, big.layers[0].digest)
PY
  read -r MANIFEST SMALL_BLOB BIG_BLOB <"${WORK}/refs"
}

start_nginx() {
  NGINX_PORT="$(free_port)"
  mkdir -p "${WORK}/nginx"
  cat >"${WORK}/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid ${WORK}/nginx/nginx.pid;
error_log ${WORK}/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  client_body_temp_path ${WORK}/nginx;
  server {
    listen 127.0.0.1:${NGINX_PORT};
    location /v2/ { alias ${WORK}/registry/; default_type application/octet-stream; }
  }
}
CONF
  nginx -c "${WORK}/nginx/nginx.conf" &
  NGINX_PID=$!
  wait_for "http://127.0.0.1:${NGINX_PORT}/v2/blobs/${SMALL_BLOB}"
}

start_registry() {
  REGISTRY_PORT="$(free_port)"
  if [[ -n "${MINIMAL_REGISTRY_BIN:-}" ]]; then
    "${MINIMAL_REGISTRY_BIN}" -d "${WORK}/registry" -p "${REGISTRY_PORT}" -q 2>"${WORK}/registry.log" &
  else
    PYTHONPATH="${ROOT}" "${PYTHON}" -m minimal_registry -d "${WORK}/registry" -p "${REGISTRY_PORT}" -q 2>"${WORK}/registry.log" &
  fi
  REGISTRY_PID=$!
  wait_for "http://127.0.0.1:${REGISTRY_PORT}/v2/"
}

wait_for() {
  local _
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  fatal "nothing answered at $1"
}

# wrk's "Requests/sec" and "Transfer/sec" (normalised to MiB/s) for one URL.
measure() {
  local output rps transfer
  output="$(wrk -t1 -c"${CONNECTIONS}" -d"${DURATION}s" --timeout 30s "$1")"
  rps="$(awk '/Requests\/sec/ {print $2}' <<<"${output}")"
  transfer="$(awk '/Transfer\/sec/ {v=$2; u=substr(v, length(v)-1); n=v+0;
      if (u=="GB") n*=1024; else if (u=="KB") n/=1024; else if (u!="MB") n/=1048576; printf "%.1f", n}' <<<"${output}")"
  echo "${rps} ${transfer}"
}

# A pid and all its descendants (the one-file binary is three processes: two bootloaders
# and Python).
process_tree() {
  local pid
  for pid in "$@"; do
    echo "${pid}"
    # shellcheck disable=SC2046 # a list of pids
    process_tree $(pgrep -P "${pid}")
  done
}

rss_kib() {
  local pid total=0 kib
  for pid in "$@"; do
    kib="$(awk '/^VmRSS/ {print $2}' "/proc/${pid}/status" 2>/dev/null || echo 0)"
    total=$((total + kib))
  done
  echo "${total}"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

row() { printf '%-34s %14s %14s %8s\n' "$@"; }

run_benchmarks() {
  local name path theirs_path ours_rps ours_mib theirs_rps theirs_mib
  row "figure" "registry" "nginx" "ratio"
  for name in manifest small-blob big-blob; do
    case "${name}" in
      manifest) path="library/hello/manifests/${MANIFEST}"; theirs_path="${path}" ;;
      small-blob) path="library/hello/blobs/${SMALL_BLOB}"; theirs_path="blobs/${SMALL_BLOB}" ;;
      big-blob) path="big/blob/blobs/${BIG_BLOB}"; theirs_path="blobs/${BIG_BLOB}" ;;
    esac
    read -r ours_rps ours_mib <<<"$(measure "http://127.0.0.1:${REGISTRY_PORT}/v2/${path}")"
    read -r theirs_rps theirs_mib <<<"$(measure "http://127.0.0.1:${NGINX_PORT}/v2/${theirs_path}")"
    if [[ "${name}" == big-blob ]]; then
      row "${name} MiB/s" "${ours_mib}" "${theirs_mib}" "$(ratio "${ours_mib}" "${theirs_mib}")"
    else
      row "${name} requests/s" "${ours_rps}" "${theirs_rps}" "$(ratio "${ours_rps}" "${theirs_rps}")"
    fi
  done
  local ours theirs
  # shellcheck disable=SC2046 # lists of pids
  ours="$(rss_kib $(process_tree "${REGISTRY_PID}"))"
  # shellcheck disable=SC2046
  theirs="$(rss_kib $(process_tree "${NGINX_PID}"))"
  row "resident memory after load KiB" "${ours}" "${theirs}" "$(ratio "${ours}" "${theirs}")"
}

# Milliseconds from starting a server to its first 200 on URL, median of START_RUNS starts.
startup_ms() {
  local url="$1" run started finished pid times=()
  shift
  for run in $(seq 1 "${START_RUNS}"); do
    started="$(date +%s%N)"
    "$@" >/dev/null 2>&1 &
    pid=$!
    until curl -fsS -o /dev/null --max-time 1 "${url}" 2>/dev/null; do
      kill -0 "${pid}" 2>/dev/null || fatal "server exited during start-up run ${run}: $*"
    done
    finished="$(date +%s%N)"
    kill "${pid}"
    wait "${pid}" 2>/dev/null || true
    times+=("$(((finished - started) / 1000000))")
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}

measure_startup() {
  local port ours theirs
  port="$(free_port)"
  if [[ -n "${MINIMAL_REGISTRY_BIN:-}" ]]; then
    ours="$(startup_ms "http://127.0.0.1:${port}/v2/" "${MINIMAL_REGISTRY_BIN}" -q -d "${WORK}/registry" -p "${port}")"
  else
    ours="$(PYTHONPATH="${ROOT}" startup_ms "http://127.0.0.1:${port}/v2/" "${PYTHON}" -m minimal_registry -q -d "${WORK}/registry" -p "${port}")"
  fi
  sed "s/listen 127.0.0.1:${NGINX_PORT};/listen 127.0.0.1:${port};/; s|pid .*;|pid ${WORK}/nginx/startup.pid;|" \
    "${WORK}/nginx/nginx.conf" >"${WORK}/nginx/startup.conf"
  theirs="$(startup_ms "http://127.0.0.1:${port}/v2/blobs/${SMALL_BLOB}" nginx -c "${WORK}/nginx/startup.conf")"
  row "start-up to first answer, ms" "${ours}" "${theirs}" "$(ratio "${ours}" "${theirs}")"
}

parse_args "$@"
check_tools
WORK="$(mktemp -d)"
trap cleanup EXIT
chmod 755 "${WORK}"  # nginx's workers run as an unprivileged user
build_tree
start_nginx
start_registry
info "wrk: ${CONNECTIONS} connections, ${DURATION}s per figure"
run_benchmarks
measure_startup
