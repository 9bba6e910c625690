#!/usr/bin/env bash
#
# The reference benchmark: minimal-registry against nginx serving the same content tree as
# static files, on 127.0.0.1 only. Subjects, each measured in turn and the turns repeated
# (A B C A B C ...), the median of the rounds reported:
#
#   nginx-auto        nginx, worker_processes auto (what an operator runs), sendfile on
#   nginx-1           nginx, one worker
#   source            minimal-registry from this tree (python -m minimal_registry)
#   binary            the one-file binary (MINIMAL_REGISTRY_BIN, or dist/ if built)
#   source-workers2   minimal-registry from this tree with --workers 2
#
# minimal-registry runs as in production: access log ON, written to a file.
#
# Figures: manifest GET by tag (wrk -t2 -c64: requests/s, p50, p99), 8 simultaneous
# downloads of a big blob (aggregate MB/s), 500 simultaneous small-blob GETs on 500 new
# connections (seconds until the last is answered), resident memory of the whole process
# tree after the load, start-up to the first answer (median of several starts). Ratios are
# to nginx-auto.
#
# Usage: scripts/benchmark.sh [--quick] [--json FILE] [--rounds N] [-d SECONDS]
#
#   --quick      one round, 2 s wrk runs, a 64 MiB blob, 3 starts (CI runs this; no
#                figure is checked)
#   --json FILE  also write every figure, median and ratio as JSON
#   --rounds N   rounds of all subjects (default 3)
#   -d SECONDS   length of each wrk run (default 5)
#
# Environment:
#   MINIMAL_REGISTRY_BIN  the binary subject (default: dist/minimal-registry-linux-<arch>
#                         when it exists; otherwise that subject is left out)
#   PYTHON                the Python that runs the source tree (default: python3)
#   BIG_BLOB_MIB          size of the big blob (default 512; 64 with --quick)
#
# Needs: wrk, nginx, curl (Debian packages of those names).
set -o errexit -o nounset -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION=5
ROUNDS=3
START_RUNS=7
JSON_FILE=""
PYTHON="${PYTHON:-python3}"
BIG_BLOB_MIB="${BIG_BLOB_MIB:-}"
QUICK=0

info() { echo "[benchmark] $*" >&2; }
fatal() { echo "[benchmark] error: $*" >&2; exit 1; }

parse_args() {
  while (($# > 0)); do
    case "$1" in
      --quick) QUICK=1; shift ;;
      --json) JSON_FILE="$2"; shift 2 ;;
      --rounds) ROUNDS="$2"; shift 2 ;;
      -d) DURATION="$2"; shift 2 ;;
      -h|--help) sed -n '2,/^set -o/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) fatal "unknown argument $1 (see -h)" ;;
    esac
  done
  if ((QUICK)); then
    ROUNDS=1; DURATION=2; START_RUNS=3; BIG_BLOB_MIB="${BIG_BLOB_MIB:-64}"
  fi
  BIG_BLOB_MIB="${BIG_BLOB_MIB:-512}"
  if [[ -n "${JSON_FILE}" && "${JSON_FILE}" != /* ]]; then JSON_FILE="${PWD}/${JSON_FILE}"; fi
}

check_tools() {
  local tool
  for tool in wrk nginx curl; do
    command -v "${tool}" >/dev/null || fatal "${tool} is not installed (apt-get install ${tool})"
  done
}

find_binary() {
  BINARY="${MINIMAL_REGISTRY_BIN:-}"
  if [[ -z "${BINARY}" ]]; then
    local arch
    case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=unknown ;; esac
    [[ -x "${ROOT}/dist/minimal-registry-linux-${arch}" ]] && BINARY="${ROOT}/dist/minimal-registry-linux-${arch}"
  fi
  if [[ -n "${BINARY}" ]]; then
    BINARY="$(cd "$(dirname "${BINARY}")" && pwd)/$(basename "${BINARY}")"
  else
    info "no one-file binary (scripts/build-binary.sh, or MINIMAL_REGISTRY_BIN): measuring the source tree only"
  fi
}

# shellcheck disable=SC2317 # run by `trap cleanup EXIT`
cleanup() {
  stop_subject
  rm -rf "${WORK}"
}

free_port() {
  "${PYTHON}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

build_tree() {
  info "building a content tree (a small image and a ${BIG_BLOB_MIB} MiB blob)"
  PYTHONPATH="${ROOT}/tests" "${PYTHON}" - "${WORK}/registry" "${BIG_BLOB_MIB}" >"${WORK}/refs" <<'PY'
import sys
from pathlib import Path
from imagetree import TreeBuilder
builder = TreeBuilder(Path(sys.argv[1]))
small = builder.image("library/hello", "latest", files={"hello.txt": b"hello\n"})
big = builder.image("big/blob", "latest", layer_bytes=int(sys.argv[2]) * 1024 * 1024)
print(small.layers[0].digest, big.layers[0].digest)
PY
  read -r SMALL_BLOB BIG_BLOB <"${WORK}/refs"
}

nginx_conf() {  # workers port file
  mkdir -p "${WORK}/nginx"
  cat >"$3" <<CONF
worker_processes $1;
daemon off;
pid $3.pid;
error_log ${WORK}/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  client_body_temp_path ${WORK}/nginx;
  server {
    listen 127.0.0.1:$2 backlog=4096;
    location /v2/ { alias ${WORK}/registry/; default_type application/octet-stream; }
  }
}
CONF
}

# The command line of a subject on a port.
subject_command() {  # subject port
  case "$1" in
    nginx-auto) nginx_conf auto "$2" "${WORK}/nginx/auto-$2.conf"; echo "nginx -c ${WORK}/nginx/auto-$2.conf" ;;
    nginx-1) nginx_conf 1 "$2" "${WORK}/nginx/one-$2.conf"; echo "nginx -c ${WORK}/nginx/one-$2.conf" ;;
    source) echo "${PYTHON} -m minimal_registry -d ${WORK}/registry -p $2" ;;
    source-workers2) echo "${PYTHON} -m minimal_registry -d ${WORK}/registry -p $2 --workers 2" ;;
    binary) echo "${BINARY} -d ${WORK}/registry -p $2" ;;
  esac
}

# URL paths: the registry API for minimal-registry, the files themselves for nginx.
paths_for() {
  case "$1" in
    nginx-*) MANIFEST_PATH="/v2/library/hello/manifests/latest"; SMALL_PATH="/v2/blobs/${SMALL_BLOB}"
             BIG_PATH="/v2/blobs/${BIG_BLOB}"; READY_PATH="${SMALL_PATH}" ;;
    *) MANIFEST_PATH="/v2/library/hello/manifests/latest"; SMALL_PATH="/v2/library/hello/blobs/${SMALL_BLOB}"
       BIG_PATH="/v2/big/blob/blobs/${BIG_BLOB}"; READY_PATH="/v2/" ;;
  esac
}

start_subject() {  # subject
  local command
  PORT="$(free_port)"
  command="$(subject_command "$1" "${PORT}")"
  # shellcheck disable=SC2086 # the command line is words
  PYTHONPATH="${ROOT}" ${command} >/dev/null 2>>"${WORK}/access-$1.log" &
  SUBJECT_PID=$!
  paths_for "$1"
  wait_for "http://127.0.0.1:${PORT}${READY_PATH}"
}

stop_subject() {
  if [[ -n "${SUBJECT_PID:-}" ]]; then
    kill "${SUBJECT_PID}" 2>/dev/null || true
    wait "${SUBJECT_PID}" 2>/dev/null || true
    SUBJECT_PID=""
  fi
}

wait_for() {
  local _
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  fatal "nothing answered at $1"
}

record() { echo "$1 $2 $3 $4" >>"${WORK}/results"; }  # round subject figure value

# wrk's seconds ("1.23ms", "15.00us", "1.2s") as milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

measure_manifest() {  # round subject
  local output
  output="$(wrk -t2 -c64 -d"${DURATION}s" --timeout 10s --latency "http://127.0.0.1:${PORT}${MANIFEST_PATH}")"
  grep -q "Non-2xx" <<<"${output}" && fatal "$2 answered errors to the manifest GET: ${output}"
  record "$1" "$2" manifest_rps "$(awk '/Requests\/sec/ {print $2}' <<<"${output}")"
  record "$1" "$2" manifest_p50_ms "$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"${output}")")"
  record "$1" "$2" manifest_p99_ms "$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"${output}")")"
}

# Aggregate MB/s (10^6) of 8 simultaneous whole downloads of the big blob.
measure_big_blob() {  # round subject
  local started finished bytes i pids=()
  started="$(date +%s%N)"
  for i in 1 2 3 4 5 6 7 8; do
    curl -fsS -o /dev/null -w '%{size_download}\n' "http://127.0.0.1:${PORT}${BIG_PATH}" >"${WORK}/big.${i}" &
    pids+=($!)
  done
  wait "${pids[@]}"
  finished="$(date +%s%N)"
  bytes="$(cat "${WORK}"/big.? | awk '{s += $1} END {print s}')"
  record "$1" "$2" big_blob_mbps "$(awk -v b="${bytes}" -v ns="$((finished - started))" 'BEGIN {printf "%.0f", b / (ns / 1e9) / 1e6}')"
}

# Seconds from sending 500 small-blob GETs on 500 new connections at once to the last answer.
measure_small_blobs() {  # round subject
  local started finished answered
  local url="http://127.0.0.1:${PORT}${SMALL_PATH}"
  seq 1 500 | sed "s|.*|url = \"${url}\"\noutput = \"/dev/null\"|" >"${WORK}/small.curl"
  started="$(date +%s%N)"
  answered="$(curl --silent --show-error --no-progress-meter --parallel --parallel-immediate --parallel-max 500 -K "${WORK}/small.curl" -w '%{http_code}\n' | grep -c '^200$' || true)"
  finished="$(date +%s%N)"
  [[ "${answered}" == 500 ]] || fatal "$2 answered ${answered} of 500 small-blob GETs with 200"
  record "$1" "$2" small_blobs_500_s "$(awk -v ns="$((finished - started))" 'BEGIN {printf "%.3f", ns / 1e9}')"
}

# A pid and all its descendants (the one-file binary is three processes: two bootloaders
# and Python; nginx a master and its workers; --workers N a parent and N children).
process_tree() {
  local pid
  for pid in "$@"; do
    echo "${pid}"
    # shellcheck disable=SC2046 # a list of pids
    process_tree $(pgrep -P "${pid}")
  done
}

measure_rss() {  # round subject
  local pid total=0 kib
  # shellcheck disable=SC2046 # a list of pids
  for pid in $(process_tree "${SUBJECT_PID}"); do
    kib="$(awk '/^VmRSS/ {print $2}' "/proc/${pid}/status" 2>/dev/null || echo 0)"
    total=$((total + kib))
  done
  record "$1" "$2" rss_after_load_mib "$(awk -v k="${total}" 'BEGIN {printf "%.1f", k / 1024}')"
}

# Milliseconds from starting a subject to its first answer, median of START_RUNS starts.
measure_startup() {  # subject
  local run started finished pid port command url times=()
  for run in $(seq 1 "${START_RUNS}"); do
    port="$(free_port)"
    command="$(subject_command "$1" "${port}")"
    paths_for "$1"
    url="http://127.0.0.1:${port}${READY_PATH}"
    started="$(date +%s%N)"
    # shellcheck disable=SC2086 # the command line is words
    PYTHONPATH="${ROOT}" ${command} >/dev/null 2>>"${WORK}/startup-$1.log" &
    pid=$!
    until curl -fsS -o /dev/null --max-time 1 "${url}" 2>/dev/null; do
      kill -0 "${pid}" 2>/dev/null || fatal "$1 exited during start-up run ${run}"
    done
    finished="$(date +%s%N)"
    kill "${pid}"
    wait "${pid}" 2>/dev/null || true
    times+=("$(((finished - started) / 1000000))")
  done
  record 0 "$1" startup_ms "$(printf '%s\n' "${times[@]}" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')"
}

run_rounds() {
  local round subject
  for round in $(seq 1 "${ROUNDS}"); do
    for subject in "${SUBJECTS[@]}"; do
      info "round ${round}/${ROUNDS}: ${subject}"
      start_subject "${subject}"
      measure_manifest "${round}" "${subject}"
      measure_big_blob "${round}" "${subject}"
      measure_small_blobs "${round}" "${subject}"
      measure_rss "${round}" "${subject}"
      stop_subject
    done
  done
  for subject in "${SUBJECTS[@]}"; do
    info "start-up: ${subject}"
    measure_startup "${subject}"
  done
}

# Medians, ratios to nginx-auto, the table, and the JSON file.
report() {
  "${PYTHON}" - "${WORK}/results" "${JSON_FILE}" "${ROUNDS}" "${DURATION}" "${BIG_BLOB_MIB}" <<'PY'
import json, os, platform, statistics, sys
from collections import defaultdict
results, json_file, rounds, duration, big_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
values = defaultdict(lambda: defaultdict(list))
order = []
for line in open(results):
    _round, subject, figure, value = line.split()
    if subject not in order:
        order.append(subject)
    values[subject][figure].append(float(value))
figures = [("manifest_rps", "manifest GET, requests/s", True), ("manifest_p50_ms", "manifest p50, ms", False),
           ("manifest_p99_ms", "manifest p99, ms", False), ("big_blob_mbps", f"8 x {big_mib} MiB blob, MB/s", True),
           ("small_blobs_500_s", "500 simultaneous small blobs, s", False),
           ("rss_after_load_mib", "resident memory after load, MiB", False), ("startup_ms", "start-up to first answer, ms", False)]
medians = {s: {f: statistics.median(v) for f, v in values[s].items()} for s in order}
reference = medians.get("nginx-auto", {})
ratios = {s: {f: round(m / reference[f], 3) for f, m in medians[s].items() if reference.get(f)} for s in order}
width = max(len(label) for _, label, _ in figures) + 2
print("%-*s" % (width, "figure (median of %d rounds)" % rounds) + "".join("%16s" % s for s in order))
for key, label, _ in figures:
    print("%-*s" % (width, label) + "".join("%16s" % ("%g" % medians[s][key] if key in medians[s] else "-") for s in order))
print()
print("%-*s" % (width, "ratio to nginx-auto") + "".join("%16s" % s for s in order))
for key, label, _ in figures:
    print("%-*s" % (width, label) + "".join("%16s" % ("%.2fx" % ratios[s][key] if key in ratios[s] else "-") for s in order))
if json_file:
    document = {"machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()},
                "rounds": rounds, "wrk_seconds": float(duration), "big_blob_mib": int(big_mib),
                "values": {s: dict(values[s]) for s in order}, "medians": medians, "ratios_to_nginx_auto": ratios}
    with open(json_file, "w") as out:
        json.dump(document, out, indent=1)
    print("\nJSON: " + json_file)
PY
}

parse_args "$@"
# `python -m` looks in the current directory first: measure this tree, not another checkout.
cd "${ROOT}"
check_tools
find_binary
WORK="$(mktemp -d)"
trap cleanup EXIT
chmod 755 "${WORK}"  # nginx's workers run as an unprivileged user
: >"${WORK}/results"
SUBJECTS=(nginx-auto nginx-1 source)
[[ -n "${BINARY}" ]] && SUBJECTS+=(binary)
# (Not `| grep -q`: with pipefail, grep leaving early fails the pipeline.)
USAGE="$(PYTHONPATH="${ROOT}" "${PYTHON}" -m minimal_registry --help 2>/dev/null || true)"
if [[ "${USAGE}" == *--workers* ]]; then
  SUBJECTS+=(source-workers2)
fi
build_tree
info "subjects: ${SUBJECTS[*]}; ${ROUNDS} round(s), wrk ${DURATION}s"
run_rounds
report
