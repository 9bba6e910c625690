#!/usr/bin/env bash
#
# download-system-images.sh: on a connected host, fill a minimal-registry content tree with
# the system images of a K3s release (and any others), ready to carry into an air gap.
#
# Usage:
#   download-system-images.sh [-v VERSION] [-d DIR] [-f EXTRA_LIST] [-l IMAGE_LIST]
#                             [-p PLATFORM[,PLATFORM...]|all] [-n] [-s] [--tool crane|skopeo] [-h]
#
#   -v, --version VERSION   K3s release (v1.31.4+k3s1) or channel (stable, latest, v1.31)
#                           whose k3s-images.txt to use (default: stable).
#   -d, --directory DIR     The content tree to fill (default: ./registry). registries.yaml
#                           is written beside it, in DIR/.. .
#   -f, --file EXTRA_LIST   Also pull the images listed in this file (one per line, # comments).
#   -l, --list IMAGE_LIST   Use this local k3s-images.txt instead of downloading it.
#   -p, --platform LIST     Platforms to keep, os/arch[/variant], comma-separated, or `all`
#                           (default: linux/amd64). The tag keeps its upstream digest: the
#                           index is stored whole, with only these platforms' images.
#   -n, --no-trim           Keep the registry domain (DIR/docker.io/rancher/...), for
#                           containerd's ?ns= lookups; registries.yaml then mirrors every
#                           upstream registry found. Default: trim it (DIR/rancher/...), for
#                           install.sh --system-default-registry bootstrap-registry.airgap.
#   -s, --skip-k3s          Pull only the images of -f EXTRA_LIST.
#       --tool crane|skopeo Image tool (default: crane if installed, else skopeo).
#   -h, --help              This help.
#
# Environment:
#   K3S_RELEASE_URL        Where release files live (default:
#                          https://github.com/k3s-io/k3s/releases/download); the list is
#                          $K3S_RELEASE_URL/<version, + as %2B>/k3s-images.txt.
#   K3S_CHANNEL_URL        Where channels redirect to their version (default:
#                          https://update.k3s.io/v1-release/channels).
#   MINIMAL_REGISTRY_CMD   How to run minimal-registry (default: `minimal-registry` on PATH,
#                          else `python3 -m minimal_registry` from this checkout).
#   REGISTRY_ENDPOINT      The node's registry URL, for registries.yaml
#                          (default: http://127.0.0.1:9080).
#   PLAIN_HTTP_REGISTRIES  Registry hosts (space or comma separated) to reach over plain
#                          HTTP without TLS verification (skopeo --tls-verify=false, crane
#                          --insecure): a local mirror, or a test registry on 127.0.0.1.
#   PULL_RETRIES           Attempts per image before it counts as failed (default: 3).
#   RETRY_DELAY            Seconds between attempts (default: 5).
#   TMPDIR                 Where images are downloaded before import (needs room for the
#                          largest image).
#
# Every image is laid into the tree by `minimal-registry import`, which checks every digest.
# References are read by `minimal-registry normalize`, the way docker and containerd read
# them: `busybox` is docker.io/library/busybox, filed as library/busybox (with -n,
# docker.io/library/busybox), as `import` files a docker-save archive's busybox:latest.
# Images already in the tree, with the same digest and platforms, are not pulled again. The
# run ends with a summary (pulled, skipped, failed) and exits 1 if any image failed.

set -o errexit -o nounset -o pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT_ROOT="$(dirname "${SCRIPT_DIR}")"

K3S_RELEASE_URL="${K3S_RELEASE_URL:-https://github.com/k3s-io/k3s/releases/download}"
K3S_CHANNEL_URL="${K3S_CHANNEL_URL:-https://update.k3s.io/v1-release/channels}"
REGISTRY_ENDPOINT="${REGISTRY_ENDPOINT:-http://127.0.0.1:9080}"
PLAIN_HTTP_REGISTRIES="${PLAIN_HTTP_REGISTRIES:-}"
PULL_RETRIES="${PULL_RETRIES:-3}"
RETRY_DELAY="${RETRY_DELAY:-5}"
MIRRORED_HOST="bootstrap-registry.airgap"
# `minimal-registry import` exit code for "content missing": pull the image.
EXIT_MISSING=3

VERSION=""
REGISTRY_DIR="registry"
EXTRA_LIST=""
IMAGE_LIST=""
PLATFORM="linux/amd64"
NO_TRIM=""
SKIP_K3S=""
TOOL=""

WORK_DIR=""
DOMAIN=""
NAME=""
TAG=""
TLS=()
MR=()
IMAGES=()
REFERENCES=()
PULLED=()
SKIPPED=()
FAILED=()

# --- helpers ---

info() { printf '[INFO]  %s\n' "$*" >&2; }
warn() { printf '[WARN]  %s\n' "$*" >&2; }
fatal() {
    printf '[ERROR] %s\n' "$*" >&2
    exit 2
}

usage() {
    sed -n '/^# Usage:/,/^# Every image/p' "${BASH_SOURCE[0]}" | sed -e 's/^# \{0,1\}//' -e '$d'
}

cleanup() {
    if [[ -n "${WORK_DIR}" && -d "${WORK_DIR}" ]]; then
        rm -rf -- "${WORK_DIR}"
    fi
}

is_plain_http() {
    local domain="$1" host
    for host in ${PLAIN_HTTP_REGISTRIES//,/ }; do
        [[ "${host}" == "${domain}" ]] && return 0
    done
    return 1
}

# --- steps ---

parse_args() {
    while (($# > 0)); do
        case "$1" in
            -v | --version) VERSION="${2:?-v needs a version}"; shift 2 ;;
            -d | --directory) REGISTRY_DIR="${2:?-d needs a directory}"; shift 2 ;;
            -f | --file) EXTRA_LIST="${2:?-f needs a file}"; shift 2 ;;
            -l | --list) IMAGE_LIST="${2:?-l needs a file}"; shift 2 ;;
            -p | --platform) PLATFORM="${2:?-p needs a platform}"; shift 2 ;;
            -n | --no-trim) NO_TRIM=1; shift ;;
            -s | --skip-k3s) SKIP_K3S=1; shift ;;
            --tool) TOOL="${2:?--tool needs crane or skopeo}"; shift 2 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; fatal "unknown argument: $1" ;;
        esac
    done
    REGISTRY_DIR="${REGISTRY_DIR%/}"
    [[ -n "${REGISTRY_DIR}" ]] || REGISTRY_DIR="/"
    [[ -z "${EXTRA_LIST}" || -f "${EXTRA_LIST}" ]] || fatal "extra image list ${EXTRA_LIST} does not exist"
    [[ -z "${IMAGE_LIST}" || -f "${IMAGE_LIST}" ]] || fatal "image list ${IMAGE_LIST} does not exist"
    [[ -z "${SKIP_K3S}" || -n "${EXTRA_LIST}" ]] || fatal "-s skips the K3s images: give the images to pull with -f FILE"
    [[ "${PULL_RETRIES}" =~ ^[1-9][0-9]*$ ]] || fatal "PULL_RETRIES must be a positive number, not '${PULL_RETRIES}'"
    [[ "${RETRY_DELAY}" =~ ^[0-9]+$ ]] || fatal "RETRY_DELAY must be a number of seconds, not '${RETRY_DELAY}'"
    local platform
    if [[ "${PLATFORM}" != "all" ]]; then
        for platform in ${PLATFORM//,/ }; do
            [[ "${platform}" =~ ^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$ ]] ||
                fatal "bad platform '${platform}': write os/arch[/variant], e.g. linux/arm64, or all"
        done
    fi
}

choose_tool() {
    if [[ -z "${TOOL}" ]]; then
        if command -v crane >/dev/null; then
            TOOL=crane
        elif command -v skopeo >/dev/null; then
            TOOL=skopeo
        else
            fatal "neither crane nor skopeo is installed: install one (apt-get install skopeo)"
        fi
    fi
    case "${TOOL}" in
        crane | skopeo) command -v "${TOOL}" >/dev/null || fatal "--tool ${TOOL}: ${TOOL} is not installed" ;;
        *) fatal "--tool must be crane or skopeo, not '${TOOL}'" ;;
    esac
    info "pulling with ${TOOL}"
}

choose_minimal_registry() {
    if [[ -n "${MINIMAL_REGISTRY_CMD:-}" ]]; then
        read -r -a MR <<<"${MINIMAL_REGISTRY_CMD}"
    elif command -v minimal-registry >/dev/null; then
        MR=(minimal-registry)
    elif [[ -f "${PROJECT_ROOT}/minimal_registry/__main__.py" ]]; then
        export PYTHONPATH="${PROJECT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
        MR=(python3 -m minimal_registry)
    else
        fatal "minimal-registry not found: put it on PATH or set MINIMAL_REGISTRY_CMD"
    fi
    "${MR[@]}" --version >/dev/null 2>&1 || fatal "cannot run '${MR[*]}': set MINIMAL_REGISTRY_CMD"
}

make_work_dir() {
    WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/download-system-images.XXXXXX")"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

resolve_version() {
    if [[ -n "${SKIP_K3S}" || -n "${IMAGE_LIST}" ]]; then
        return
    fi
    local channel="${VERSION:-stable}"
    if [[ "${channel}" =~ ^v[0-9]+\.[0-9]+\.[0-9]+ ]]; then
        VERSION="${channel}"
        return
    fi
    VERSION="$(curl -fsSL -o /dev/null -w '%{url_effective}' "${K3S_CHANNEL_URL}/${channel}")" ||
        fatal "cannot resolve channel '${channel}' at ${K3S_CHANNEL_URL}/${channel}"
    VERSION="${VERSION##*/}"
    [[ "${VERSION}" =~ ^v[0-9] ]] || fatal "channel '${channel}' resolved to '${VERSION}', not a version"
    info "channel ${channel} is ${VERSION}"
}

fetch_image_list() {
    if [[ -n "${SKIP_K3S}" ]]; then
        return
    fi
    if [[ -z "${IMAGE_LIST}" ]]; then
        IMAGE_LIST="${WORK_DIR}/k3s-images.txt"
        local url="${K3S_RELEASE_URL}/${VERSION//+/%2B}/k3s-images.txt"
        info "downloading ${url}"
        curl -fsSL --retry 3 -o "${IMAGE_LIST}" "${url}" || fatal "cannot download ${url}"
    fi
}

read_lists() {
    local file line word
    declare -A seen=()
    for file in ${IMAGE_LIST:+"${IMAGE_LIST}"} ${EXTRA_LIST:+"${EXTRA_LIST}"}; do
        while IFS= read -r line || [[ -n "${line}" ]]; do
            line="${line%%#*}"
            for word in ${line}; do
                if [[ -z "${seen[${word}]:-}" ]]; then
                    seen[${word}]=1
                    IMAGES+=("${word}")
                fi
            done
        done <"${file}"
    done
    ((${#IMAGES[@]} > 0)) || fatal "no images to pull (the lists are empty)"
    info "${#IMAGES[@]} images for ${PLATFORM}"
}

# Every reference as minimal-registry reads it, `DOMAIN PATH TAG` in REFERENCES (one per
# image), so this script and the importer cannot disagree on what a list names (`busybox` is
# docker.io library/busybox). A reference it cannot read stops the run before any pull.
normalize_references() {
    local described
    described="$("${MR[@]}" normalize "${IMAGES[@]}")" ||
        fatal "the image lists hold a reference minimal-registry cannot read (see above)"
    mapfile -t REFERENCES <<<"${described}"
    ((${#REFERENCES[@]} == ${#IMAGES[@]})) ||
        fatal "'${MR[*]} normalize' answered ${#REFERENCES[@]} lines for ${#IMAGES[@]} images"
}

# Sets DOMAIN, NAME (the full name, for import --name) and TAG from a REFERENCES line.
use_reference() {
    local path
    read -r DOMAIN path TAG <<<"$1"
    NAME="${DOMAIN}/${path}"
}

# The tool's options for a registry: plain HTTP ones get no TLS verification.
tls_args() {
    TLS=()
    if is_plain_http "${DOMAIN}"; then
        if [[ "${TOOL}" == skopeo ]]; then TLS=(--tls-verify=false); else TLS=(--insecure); fi
    fi
}

# The top manifest (an index, usually) byte for byte: it fixes the tag's digest.
fetch_top_manifest() {
    local image="$1" out="$2"
    tls_args
    if [[ "${TOOL}" == skopeo ]]; then
        skopeo inspect --raw "${TLS[@]}" "docker://${image}" >"${out}"
    else
        crane manifest "${TLS[@]}" "${image}" >"${out}"
    fi
}

# Download the image's content for PLATFORM into directories under $2, one per platform.
pull_content() {
    local image="$1" dir="$2" platform number=0 os arch variant
    tls_args
    if [[ "${PLATFORM}" == all ]]; then
        if [[ "${TOOL}" == skopeo ]]; then
            # dir: keeps every manifest byte for byte; oci: would convert Docker ones (new digests).
            skopeo copy --quiet --all "${TLS[@]/--tls-verify/--src-tls-verify}" "docker://${image}" "dir:${dir}/all"
        else
            crane pull "${TLS[@]}" --format=oci "${image}" "${dir}/all"
        fi
        return
    fi
    for platform in ${PLATFORM//,/ }; do
        number=$((number + 1))
        if [[ "${TOOL}" == skopeo ]]; then
            IFS=/ read -r os arch variant <<<"${platform}"
            skopeo --override-os "${os}" --override-arch "${arch}" ${variant:+--override-variant "${variant}"} \
                copy --quiet "${TLS[@]/--tls-verify/--src-tls-verify}" "docker://${image}" "dir:${dir}/${number}"
        else
            crane pull "${TLS[@]}" --format=oci --platform="${platform}" "${image}" "${dir}/${number}"
        fi
    done
}

# minimal-registry import with this run's naming and platform choices.
import_into_tree() {
    local name="$1" tag="$2"
    shift 2
    local args=(import "$@" -d "${REGISTRY_DIR}" --name "${name}" --tag "${tag}" --platform "${PLATFORM}")
    [[ -z "${NO_TRIM}" ]] || args+=(--keep-domain)
    "${MR[@]}" "${args[@]}"
}

# One attempt: returns 0 pulled, 10 skipped (already in the tree), else failed.
pull_once() {
    local image="$1" dir="$2" status=0
    rm -rf -- "${dir}"
    mkdir -p -- "${dir}/content"
    fetch_top_manifest "${image}" "${dir}/top.json" || return 1
    import_into_tree "${NAME}" "${TAG}" "${dir}/top.json" -q 2>"${dir}/check.err" || status=$?
    if ((status == 0)); then
        return 10
    elif ((status != EXIT_MISSING)); then
        cat "${dir}/check.err" >&2
        return "${status}"
    fi
    pull_content "${image}" "${dir}/content" || return 1
    local sources=("${dir}/top.json")
    local source
    for source in "${dir}/content"/*; do
        sources+=("${source}")
    done
    import_into_tree "${NAME}" "${TAG}" "${sources[@]}"
}

pull_image() {
    local image="$1" attempt status
    local dir="${WORK_DIR}/image"
    use_reference "$2"
    for ((attempt = 1; attempt <= PULL_RETRIES; attempt++)); do
        status=0
        pull_once "${image}" "${dir}" 2> >(tee "${WORK_DIR}/attempt.err" >&2) || status=$?
        wait  # for tee, so the reason below is complete
        case "${status}" in
            0) PULLED+=("${image}"); rm -rf -- "${dir}"; return ;;
            10) info "skipped ${image}: already in the tree"; SKIPPED+=("${image}"); rm -rf -- "${dir}"; return ;;
        esac
        if ((attempt < PULL_RETRIES)); then
            warn "${image}: attempt ${attempt} of ${PULL_RETRIES} failed; retrying in ${RETRY_DELAY}s"
            sleep "${RETRY_DELAY}"
        fi
    done
    local reason
    reason="$(grep -v '^\[' "${WORK_DIR}/attempt.err" | tail -n 1 | cut -c 1-300)"
    warn "${image}: failed after ${PULL_RETRIES} attempts"
    FAILED+=("${image}${reason:+ (${reason})}")
    rm -rf -- "${dir}"
}

pull_all() {
    local index
    for index in "${!IMAGES[@]}"; do
        info "pulling ${IMAGES[index]}"
        pull_image "${IMAGES[index]}" "${REFERENCES[index]}"
    done
}

write_registries_yaml() {
    local target temporary domains domain described
    target="$(dirname "${REGISTRY_DIR}")/registries.yaml"
    temporary="${WORK_DIR}/registries.yaml"
    domains=""
    if [[ -n "${NO_TRIM}" ]]; then
        for described in "${REFERENCES[@]}"; do
            domains+="${described%% *}"$'\n'
        done
        domains="$(printf '%s' "${domains}" | sort -u)"
    fi
    {
        echo "# Written by download-system-images.sh for the content tree ${REGISTRY_DIR##*/}/."
        echo "# Install as /etc/rancher/k3s/registries.yaml on each node, with minimal-registry"
        echo "# serving that tree on ${REGISTRY_ENDPOINT}."
        echo "mirrors:"
        for domain in "${MIRRORED_HOST}" ${domains}; do
            printf '  "%s":\n    endpoint:\n      - "%s"\n' "${domain}" "${REGISTRY_ENDPOINT}"
        done
    } >"${temporary}"
    if cmp -s "${temporary}" "${target}"; then
        return
    fi
    cp -- "${temporary}" "${target}.tmp.$$"
    mv -f -- "${target}.tmp.$$" "${target}"
    info "wrote ${target}"
}

summarize() {
    local image
    info "summary: pulled ${#PULLED[@]}, skipped ${#SKIPPED[@]}, failed ${#FAILED[@]}"
    for image in "${FAILED[@]}"; do
        warn "failed: ${image}"
    done
    ((${#FAILED[@]} == 0))
}

# --- main ---

main() {
    parse_args "$@"
    choose_tool
    choose_minimal_registry
    make_work_dir
    resolve_version
    fetch_image_list
    read_lists
    normalize_references
    mkdir -p -- "${REGISTRY_DIR}"
    pull_all
    write_registries_yaml
    summarize || exit 1
}

main "$@"
