#!/usr/bin/env bash
# install-node.sh: install K3s and minimal-registry on an air-gapped node from the media
# written by make-airgap-media.sh. Run it as root from the media (it needs no network):
#
#   bash install-node.sh [OPTIONS] [-- INSTALL_SH_ARGUMENTS...]
#
# Steps, each skipped when already done (a second run changes nothing and says so):
#   1. check every file on the media against SHA256SUMS; stop on any mismatch, naming the
#      file, before anything is installed;
#   2. install minimal-registry to /usr/local/bin, its unit to /etc/systemd/system, the
#      content tree to /var/lib/rancher/k3s/agent/registry (unpacked beside it, checked
#      with `minimal-registry verify --fast`, then swapped in), registries.yaml to
#      /etc/rancher/k3s/ (an existing one is kept unless --force) and k3s to /usr/local/bin;
#   3. enable and start minimal-registry and wait until /v2/ answers;
#   4. run K3s's install.sh with INSTALL_K3S_SKIP_DOWNLOAD=true: a server gets
#      `--system-default-registry bootstrap-registry.airgap` (agents get it from their server;
#      `k3s agent` has no such flag).
#
# Options:
#   --agent          install a K3s agent (needs K3S_URL and K3S_TOKEN or K3S_TOKEN_FILE)
#   --dummy-route    give the node a default route through a dummy interface if it has
#                    none (K3s needs one even with no network), now and at every boot
#   --force          replace an existing /etc/rancher/k3s/registries.yaml (saved as .bak)
#   --no-start       install and enable, but start nothing (INSTALL_K3S_SKIP_START=true)
#   --skip-k3s       install minimal-registry only; do not install k3s or run install.sh
#   --root DIR       install under DIR instead of / (tests, image building): enables units
#                    with `systemctl --root`, runs install.sh with its directories under DIR
#                    and INSTALL_K3S_SKIP_ENABLE=true, and touches nothing outside DIR
#   --media DIR      where the media's files are (default: this script's directory)
#   -h, --help       show this help
#
# Environment:
#   K3S_URL, K3S_TOKEN, K3S_TOKEN_FILE, K3S_*   read by install.sh (agents need the first two)
#   INSTALL_K3S_*            passed on to install.sh (INSTALL_K3S_SKIP_DOWNLOAD is forced to
#                            true: the binary comes from the media)
#   MINIMAL_REGISTRY_URL     where to check that the registry answers
#                            (default: http://127.0.0.1:9080, as in registries.yaml)
#   MINIMAL_REGISTRY_WAIT    seconds to wait for it (default: 60)
#
# Exit status: 0 done (or nothing to do), 1 failed (one line on stderr says why).

set -o errexit -o nounset -o pipefail

readonly SYSTEM_DEFAULT_REGISTRY=bootstrap-registry.airgap
readonly MEDIA_FILES="install.sh k3s minimal-registry minimal-registry.service registries.yaml"
readonly BIN_DIR=/usr/local/bin
readonly UNIT_DIR=/etc/systemd/system
readonly AGENT_DIR=/var/lib/rancher/k3s/agent
readonly CONTENT_DIR=${AGENT_DIR}/registry
readonly CONTENT_STAMP=${AGENT_DIR}/.registry.sha256
readonly K3S_CONFIG_DIR=/etc/rancher/k3s
readonly CACHE_DIR=/var/cache/minimal-registry
readonly ROUTE_UNIT=airgap-default-route.service

ROOT=
MEDIA=
AGENT=false
DUMMY_ROUTE=false
FORCE=false
NO_START=false
SKIP_K3S=false
INSTALL_ARGS=()
ARCHIVE=
ARCHIVE_SHA256=
NODE_ARCH=
TMP_DIR=
TOOL_DIR=
STAGING=
CHANGED=()
UNCHANGED=()
REGISTRY_CHANGED=false
UNITS_CHANGED=false

# --- helpers ---
info() { printf '[INFO]  %s\n' "$*" >&2; }
warn() { printf '[WARN]  %s\n' "$*" >&2; }
fatal() {
    printf '[ERROR] %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

changed() { CHANGED+=("$1"); info "$1"; }
unchanged() { UNCHANGED+=("$1"); }

cleanup() {
    local code=$?
    trap - EXIT
    if [ -n "${TMP_DIR}" ]; then
        rm -rf -- "${TMP_DIR}"
    fi
    if [ -n "${TOOL_DIR}" ]; then
        rm -rf -- "${TOOL_DIR}"
    fi
    if [ -n "${STAGING}" ]; then
        rm -rf -- "${STAGING}"
    fi
    exit "${code}"
}

# --- step: arguments ---
parse_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --agent) AGENT=true ;;
            --dummy-route) DUMMY_ROUTE=true ;;
            --force) FORCE=true ;;
            --no-start) NO_START=true ;;
            --skip-k3s) SKIP_K3S=true ;;
            --root) [ "$#" -ge 2 ] || fatal "--root needs a directory"; ROOT=$2; shift ;;
            --root=*) ROOT=${1#*=} ;;
            --media) [ "$#" -ge 2 ] || fatal "--media needs a directory"; MEDIA=$2; shift ;;
            --media=*) MEDIA=${1#*=} ;;
            -h | --help) usage; exit 0 ;;
            --) shift; INSTALL_ARGS=("$@"); break ;;
            *) fatal "unknown option '$1' (arguments for install.sh go after --; see --help)" ;;
        esac
        shift
    done
    verify_dir_value --media "${MEDIA}"
    verify_dir_value --root "${ROOT}"
    if [ -z "${MEDIA}" ]; then
        MEDIA=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    fi
    [ -d "${MEDIA}" ] || fatal "media directory ${MEDIA} does not exist"
    MEDIA=$(cd "${MEDIA}" && pwd)
    if [ -n "${ROOT}" ]; then
        mkdir -p -- "${ROOT}"
        ROOT=$(cd "${ROOT}" && pwd)
        [ "${ROOT}" != / ] || ROOT=
    fi
}

# Refuse a directory value that cd would take for an option or for "the previous directory"
# (`--root -x`, `--root -`), or with a newline (no path we write may hold one).
verify_dir_value() {
    case "$2" in
        -*) fatal "$1 needs a directory, not '$2' (write ./$2 for one whose name starts with -)" ;;
        *$'\n'*) fatal "$1 '${2//$'\n'/\\n}' has a newline in its name: rename it" ;;
    esac
}

# The path of a system location under --root.
target() { printf '%s%s' "${ROOT}" "$1"; }

# --- step: preconditions ---
verify_system() {
    if [ -z "${ROOT}" ] && [ "$(id -u)" -ne 0 ]; then
        fatal "run as root (sudo bash $0), or use --root DIR to install under another directory"
    fi
    local tool
    for tool in sha256sum tar gzip od find; do
        command -v "${tool}" >/dev/null 2>&1 || fatal "${tool} is needed and not installed"
    done
    if [ -z "${ROOT}" ] && ! command -v systemctl >/dev/null 2>&1; then
        fatal "systemd is needed (no systemctl found): minimal-registry runs as a systemd service"
    fi
}

verify_agent_settings() {
    local command_word=${INSTALL_ARGS[0]:-}
    case "${command_word}" in
        agent) AGENT=true; INSTALL_ARGS=("${INSTALL_ARGS[@]:1}") ;;
        server)
            [ "${AGENT}" = false ] || fatal "--agent conflicts with the install.sh command 'server'"
            INSTALL_ARGS=("${INSTALL_ARGS[@]:1}")
            ;;
    esac
    if [ "${AGENT}" = true ] && [ "${SKIP_K3S}" = false ]; then
        [ -n "${K3S_URL:-}" ] || fatal "an agent needs K3S_URL=https://SERVER:6443"
        [ -n "${K3S_TOKEN:-}${K3S_TOKEN_FILE:-}" ] || fatal "an agent needs K3S_TOKEN (or K3S_TOKEN_FILE)"
    fi
}

# --- step: check the media ---
verify_media() {
    local sums=${MEDIA}/SHA256SUMS line expected name actual
    [ -f "${sums}" ] || fatal "${sums} is missing: is ${MEDIA} media written by make-airgap-media.sh?"
    ARCHIVE=
    local listed=" "
    while IFS= read -r line || [ -n "${line}" ]; do
        line=${line%$'\r'} # the file may have passed through a Windows editor on its way
        [ -n "${line}" ] || continue
        expected=${line%% *}
        name=${line#* }
        name=${name# }
        name=${name#\*}
        case "${expected}" in
            *[!0-9a-f]* | "") fatal "SHA256SUMS has a malformed line: ${line}" ;;
        esac
        [ "${#expected}" -eq 64 ] || fatal "SHA256SUMS has a malformed line: ${line}"
        case "${name}" in
            "" | */* | .* | *[!A-Za-z0-9._-]*) fatal "SHA256SUMS names an unexpected file: ${name}" ;;
        esac
        [ -f "${MEDIA}/${name}" ] || fatal "${name} is listed in SHA256SUMS but missing from ${MEDIA}"
        info "checking ${name}"
        actual=$(sha256sum "${MEDIA}/${name}")
        actual=${actual%% *}
        if [ "${actual}" != "${expected}" ]; then
            fatal "${name} on the media is corrupt (sha256 ${actual}, SHA256SUMS says ${expected}); copy the media again"
        fi
        listed="${listed}${name} "
        case "${name}" in
            registry.tar.gz | registry.tar.zst)
                [ -z "${ARCHIVE}" ] || fatal "the media holds both ${ARCHIVE} and ${name}; write it again with make-airgap-media.sh"
                ARCHIVE=${name}
                ARCHIVE_SHA256=${expected}
                ;;
        esac
    done <"${sums}"
    for name in ${MEDIA_FILES}; do
        case "${listed}" in
            *" ${name} "*) ;;
            *) fatal "${name} is not on the media (or not in SHA256SUMS); write it again with make-airgap-media.sh" ;;
        esac
    done
    [ -n "${ARCHIVE}" ] || fatal "the media holds no registry.tar.gz or registry.tar.zst"
    if [ "${ARCHIVE}" = registry.tar.zst ] && ! command -v zstd >/dev/null 2>&1; then
        fatal "registry.tar.zst needs zstd, which this node lacks; write the media without --zstd"
    fi
    info "media checked: every file matches SHA256SUMS"
}

# The ELF machine of a file: amd64, arm64, or what it is otherwise.
# (make-airgap-media.sh has the same function: this script must stand alone on the media.)
elf_arch() {
    local header
    header=$(od -An -tx1 -N20 -v -- "$1" 2>/dev/null | tr -d ' \n')
    case "${header}" in
        7f454c46020101*) ;;
        7f454c46*) printf 'elf-other'; return ;;
        *) printf 'not-elf'; return ;;
    esac
    case "${header:36:4}" in
        3e00) printf 'amd64' ;;
        b700) printf 'arm64' ;;
        *) printf 'elf-%s' "${header:36:4}" ;;
    esac
}

verify_arch() {
    local machine media_arch
    machine=$(uname -m)
    case "${machine}" in
        x86_64 | amd64) NODE_ARCH=amd64 ;;
        aarch64 | arm64) NODE_ARCH=arm64 ;;
        *) NODE_ARCH=${machine} ;;
    esac
    media_arch=$(elf_arch "${MEDIA}/k3s")
    if [ "${media_arch}" != "${NODE_ARCH}" ]; then
        if [ -n "${ROOT}" ]; then
            warn "the media is for ${media_arch} and this machine is ${NODE_ARCH}: fine for --root, but nothing will run here"
            return
        fi
        fatal "the media is for ${media_arch} but this node is ${NODE_ARCH}: write media with --arch ${NODE_ARCH}"
    fi
}

# --- step: install files ---

# Whether two files have the same bytes (sha256sum: cmp is not on every minimal node).
same_bytes() {
    [ -f "$1" ] && [ -f "$2" ] || return 1
    local first second
    first=$(sha256sum <"$1")
    second=$(sha256sum <"$2")
    [ "${first}" = "${second}" ]
}

# Copy SOURCE to DEST with MODE by a temporary name and a rename, unless DEST already has
# the same bytes and mode. Returns 0 when it wrote, 1 when nothing changed.
install_file() {
    local source=$1 dest=$2 mode=$3
    if same_bytes "${source}" "${dest}" \
        && [ "$(stat -c '%a' -- "${dest}")" = "${mode#0}" ]; then
        return 1
    fi
    mkdir -p -- "$(dirname "${dest}")"
    local temporary
    temporary=$(mktemp "${dest}.new.XXXXXX")
    cp -- "${source}" "${temporary}"
    chmod "${mode}" -- "${temporary}"
    mv -f -- "${temporary}" "${dest}"
    return 0
}

install_binary() {
    if install_file "${MEDIA}/minimal-registry" "$(target "${BIN_DIR}/minimal-registry")" 0755; then
        changed "installed ${BIN_DIR}/minimal-registry"
        REGISTRY_CHANGED=true
    else
        unchanged "installed ${BIN_DIR}/minimal-registry"
    fi
}

install_unit() {
    if install_file "${MEDIA}/minimal-registry.service" "$(target "${UNIT_DIR}/minimal-registry.service")" 0644; then
        changed "installed ${UNIT_DIR}/minimal-registry.service"
        REGISTRY_CHANGED=true
        UNITS_CHANGED=true
    else
        unchanged "installed ${UNIT_DIR}/minimal-registry.service"
    fi
}

# Unpack the content archive beside its final place and check it, before anything on the
# node changes. Sets STAGING (empty when the installed tree is already this archive's).
stage_content() {
    local content stamp parent tool tool_arch cache
    content=$(target "${CONTENT_DIR}")
    stamp=$(target "${CONTENT_STAMP}")
    if [ -d "${content}" ] && [ -f "${stamp}" ] && [ "$(cat -- "${stamp}")" = "${ARCHIVE_SHA256}" ]; then
        return
    fi
    parent=$(dirname "${content}")
    mkdir -p -- "${parent}"
    STAGING=$(mktemp -d "${parent}/.registry.new.XXXXXX")
    info "unpacking ${ARCHIVE} into ${parent}"
    case "${ARCHIVE}" in
        registry.tar.gz) gzip -dc -- "${MEDIA}/${ARCHIVE}" ;;
        registry.tar.zst) zstd -dcq -- "${MEDIA}/${ARCHIVE}" ;;
    esac | tar -x -f - -C "${STAGING}" --no-same-owner \
        || fatal "cannot unpack ${ARCHIVE} into ${parent} (is the disk full?)"
    [ -d "${STAGING}/registry/blobs" ] || fatal "${ARCHIVE} holds no registry/blobs: not a content tree"
    if [ "$(find "${STAGING}" -mindepth 1 -maxdepth 1 | wc -l)" -ne 1 ]; then
        fatal "${ARCHIVE} holds more than registry/ at its top"
    fi

    # The media's binary checks the tree. It runs from the unit's cache directory: the media
    # may be mounted noexec, and so may /tmp, where a one-file binary unpacks itself.
    tool_arch=$(elf_arch "${MEDIA}/minimal-registry")
    if [ "${tool_arch}" != "${NODE_ARCH}" ] && [ "${tool_arch}" != not-elf ]; then
        warn "minimal-registry (${tool_arch}) cannot run on this machine: content tree not checked"
        return
    fi
    cache=$(target "${CACHE_DIR}")
    mkdir -p -- "${cache}"
    chmod 0700 -- "${cache}"
    TOOL_DIR=$(mktemp -d "${cache}/.install-node.XXXXXX")
    tool=${TOOL_DIR}/minimal-registry
    cp -- "${MEDIA}/minimal-registry" "${tool}"
    chmod 0755 -- "${tool}"
    info "checking the content tree (minimal-registry verify --fast)"
    TMPDIR=${cache} "${tool}" verify --fast -q -d "${STAGING}/registry" \
        || fatal "the content tree in ${ARCHIVE} fails minimal-registry verify --fast; nothing was installed"
}

# Swap the checked tree in: the old one is moved aside, then removed.
install_content() {
    local content stamp parent old
    if [ -z "${STAGING}" ]; then
        unchanged "installed ${CONTENT_DIR}"
        return
    fi
    content=$(target "${CONTENT_DIR}")
    stamp=$(target "${CONTENT_STAMP}")
    parent=$(dirname "${content}")
    if [ -e "${content}" ]; then
        old=$(mktemp -d "${parent}/.registry.old.XXXXXX")
        mv -- "${content}" "${old}/registry"
        if ! mv -- "${STAGING}/registry" "${content}"; then
            mv -- "${old}/registry" "${content}"
            fatal "cannot move the new content tree into ${content}; the old one is back"
        fi
        rm -rf -- "${old}"
    else
        mv -- "${STAGING}/registry" "${content}"
    fi
    rm -rf -- "${STAGING}"
    STAGING=
    printf '%s\n' "${ARCHIVE_SHA256}" >"${stamp}.new"
    mv -f -- "${stamp}.new" "${stamp}"
    changed "installed ${CONTENT_DIR}"
}

install_registries_yaml() {
    local dest
    dest=$(target "${K3S_CONFIG_DIR}/registries.yaml")
    if same_bytes "${MEDIA}/registries.yaml" "${dest}"; then
        unchanged "installed ${K3S_CONFIG_DIR}/registries.yaml"
        return
    fi
    if [ -f "${dest}" ] && [ "${FORCE}" = false ]; then
        warn "keeping the existing ${K3S_CONFIG_DIR}/registries.yaml, which differs from the media's (--force replaces it)"
        unchanged "installed ${K3S_CONFIG_DIR}/registries.yaml"
        return
    fi
    if [ -f "${dest}" ]; then
        cp -p -- "${dest}" "${dest}.bak"
        info "saved the previous registries.yaml as ${K3S_CONFIG_DIR}/registries.yaml.bak"
    fi
    install_file "${MEDIA}/registries.yaml" "${dest}" 0644 || true
    changed "installed ${K3S_CONFIG_DIR}/registries.yaml"
}

install_k3s_binary() {
    [ "${SKIP_K3S}" = false ] || return 0
    if install_file "${MEDIA}/k3s" "$(target "${BIN_DIR}/k3s")" 0755; then
        changed "installed ${BIN_DIR}/k3s"
    else
        unchanged "installed ${BIN_DIR}/k3s"
    fi
}

# A default route through a dummy interface, applied at every boot before K3s.
install_dummy_route() {
    [ "${DUMMY_ROUTE}" = true ] || return 0
    local unit=${TMP_DIR}/${ROUTE_UNIT}
    cat >"${unit}" <<'EOF'
# Written by install-node.sh --dummy-route: K3s needs a default route even on a node with no
# network. This adds one through a dummy interface when the node has none.
[Unit]
Description=Default route through dummy0 for K3s in an air gap
After=network-online.target
Before=k3s.service k3s-agent.service minimal-registry.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip route show default | grep -q . && exit 0; ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy; ip link set dummy0 up; ip addr replace 169.254.255.254/31 dev dummy0; ip route replace default via 169.254.255.255 dev dummy0 metric 1000'

[Install]
WantedBy=multi-user.target
EOF
    if install_file "${unit}" "$(target "${UNIT_DIR}/${ROUTE_UNIT}")" 0644; then
        changed "installed ${UNIT_DIR}/${ROUTE_UNIT}"
        UNITS_CHANGED=true
    else
        unchanged "installed ${UNIT_DIR}/${ROUTE_UNIT}"
    fi
}

# --- step: services ---
systemctl_root() {
    if [ -n "${ROOT}" ]; then
        systemctl --root="${ROOT}" "$@"
    else
        systemctl "$@"
    fi
}

enable_units() {
    local units=(minimal-registry.service)
    [ "${DUMMY_ROUTE}" = false ] || units+=("${ROUTE_UNIT}")
    if [ -n "${ROOT}" ] && ! command -v systemctl >/dev/null 2>&1; then
        warn "no systemctl here: ${units[*]} not enabled under ${ROOT}"
        return
    fi
    if [ -z "${ROOT}" ] && [ "${UNITS_CHANGED}" = true ]; then
        systemctl daemon-reload
    fi
    local unit
    for unit in "${units[@]}"; do
        if systemctl_root is-enabled --quiet "${unit}" 2>/dev/null; then
            unchanged "enabled ${unit}"
        else
            systemctl_root enable --quiet "${unit}"
            changed "enabled ${unit}"
        fi
    done
}

start_registry() {
    if [ -n "${ROOT}" ] || [ "${NO_START}" = true ]; then
        info "not starting minimal-registry (--root or --no-start)"
        return
    fi
    if [ "${DUMMY_ROUTE}" = true ]; then
        systemctl start "${ROUTE_UNIT}"
    fi
    if [ "${REGISTRY_CHANGED}" = true ] && systemctl is-active --quiet minimal-registry.service; then
        info "restarting minimal-registry (binary or unit changed)"
        systemctl restart minimal-registry.service
    else
        # Type=notify: this returns once the server has said READY=1.
        systemctl start minimal-registry.service \
            || fatal "minimal-registry did not start: see journalctl -u minimal-registry"
    fi
    wait_for_registry
}

# GET /v2/ answered with 200. curl if the node has it, else bash's /dev/tcp.
registry_answers() {
    local url=$1
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "${url}/v2/" 2>/dev/null
        return
    fi
    local hostport=${url#http://} status
    hostport=${hostport%%/*}
    exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" 2>/dev/null || return 1
    printf 'GET /v2/ HTTP/1.0\r\nHost: %s\r\n\r\n' "${hostport}" >&3
    IFS= read -r -t 5 status <&3 || status=
    exec 3<&-
    case "${status}" in
        "HTTP/1."?" 200"*) return 0 ;;
        *) return 1 ;;
    esac
}

wait_for_registry() {
    local url=${MINIMAL_REGISTRY_URL:-http://127.0.0.1:9080} wait=${MINIMAL_REGISTRY_WAIT:-60}
    local deadline=$((SECONDS + wait))
    until registry_answers "${url}"; do
        if [ "${SECONDS}" -ge "${deadline}" ]; then
            fatal "minimal-registry does not answer at ${url}/v2/ after ${wait}s: see journalctl -u minimal-registry"
        fi
        sleep 1
    done
    info "minimal-registry answers at ${url}/v2/"
}

# --- step: K3s ---
run_k3s_install() {
    [ "${SKIP_K3S}" = false ] || return 0
    local args=()
    if [ "${AGENT}" = true ]; then
        args=(agent)
    else
        args=(server)
        local argument has_registry=false
        for argument in "${INSTALL_ARGS[@]}"; do
            case "${argument}" in
                --system-default-registry | --system-default-registry=*) has_registry=true ;;
            esac
        done
        [ "${has_registry}" = true ] || args+=(--system-default-registry "${SYSTEM_DEFAULT_REGISTRY}")
    fi
    args+=("${INSTALL_ARGS[@]}")

    local environment=(INSTALL_K3S_SKIP_DOWNLOAD=true)
    [ "${NO_START}" = false ] || environment+=(INSTALL_K3S_SKIP_START=true)
    if [ -n "${ROOT}" ]; then
        environment+=(
            INSTALL_K3S_BIN_DIR="$(target "${BIN_DIR}")"
            INSTALL_K3S_SYSTEMD_DIR="$(target "${UNIT_DIR}")"
            INSTALL_K3S_SKIP_ENABLE=true
        )
    fi
    info "running install.sh ${args[*]}"
    # By sh, not exec: removable media is often mounted noexec (and FAT has no exec bit).
    env "${environment[@]}" sh "${MEDIA}/install.sh" "${args[@]}" \
        || fatal "K3s's install.sh failed (its messages are above)"
}

summary() {
    if [ "${#CHANGED[@]}" -eq 0 ]; then
        info "nothing to do: everything on the media was already installed"
    else
        local IFS=,
        info "done (${#CHANGED[@]} changed, ${#UNCHANGED[@]} already right):${CHANGED[*]/#/ }"
    fi
}

# --- main ---
trap cleanup EXIT
parse_args "$@"
verify_system
verify_agent_settings
verify_media
verify_arch
TMP_DIR=$(mktemp -d)
stage_content
install_binary
install_unit
install_content
install_registries_yaml
install_k3s_binary
install_dummy_route
enable_units
start_registry
run_k3s_install
summary
