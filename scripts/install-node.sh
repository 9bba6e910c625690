#!/usr/bin/env bash
# install-node.sh: install K3s and minimal-registry on an air-gapped node from the media
# written by make-airgap-media.sh. Run it as root from the media (it needs no network):
#
#   bash install-node.sh [OPTIONS] [-- INSTALL_SH_ARGUMENTS...]
#
# Steps, each skipped when already done (a second run changes nothing and says so):
#   1. check every file on the media against SHA256SUMS; stop on any mismatch, naming the
#      file, before anything is installed; pick this node's architecture's binaries
#      (media for several architectures hold k3s, k3s-arm64, minimal-registry-linux-ARCH);
#   2. merge the media's images into the content tree /var/lib/rancher/k3s/agent/registry
#      with `minimal-registry import`: images the media lacks stay, a tag the media points
#      elsewhere is re-pointed and listed ("name:tag: sha256:aaa -> sha256:bbb"), every blob
#      is hashed before it gets its name, and a server reading the tree meanwhile never sees
#      a half-written file. The installed tree is checked first (`minimal-registry verify`):
#      whatever the media holds of a missing or damaged file is repaired, and said so. The
#      free space is checked against the archive's unpacked size first. --replace swaps the
#      whole tree for the media's instead, after listing the images that go;
#   3. install minimal-registry to /usr/local/bin, its unit to /etc/systemd/system,
#      registries.yaml to /etc/rancher/k3s/ (an existing one is kept unless --force) and k3s
#      to /usr/local/bin;
#   4. enable and start minimal-registry and wait until /v2/ answers;
#   5. run K3s's install.sh with INSTALL_K3S_SKIP_DOWNLOAD=true: a server gets
#      `--system-default-registry bootstrap-registry.airgap` (agents get it from their server;
#      `k3s agent` has no such flag).
# On images-only media (make-airgap-media.sh --images-only) only step 2 runs, and step 3 for
# minimal-registry itself with --registry: nothing of K3s is touched.
#
# Options:
#   --agent          install a K3s agent (needs K3S_URL and K3S_TOKEN or K3S_TOKEN_FILE)
#   --dummy-route    give the node a default route through a dummy interface if it has
#                    none (K3s needs one even with no network), now and at every boot
#   --force          replace an existing /etc/rancher/k3s/registries.yaml (saved as .bak)
#   --no-start       install and enable, but start nothing (INSTALL_K3S_SKIP_START=true)
#   --skip-k3s       install minimal-registry only; do not install k3s or run install.sh
#   --replace        replace the node's content tree with the media's instead of merging
#                    (images the media lacks are deleted: they are listed first)
#   --registry       images-only media: also install or upgrade minimal-registry itself
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
#   INSTALL_NODE_ARCH        the node's architecture, instead of `uname -m` (amd64, arm64;
#                            for installing under --root for another machine)
#
# Exit status: 0 done (or nothing to do), 1 failed (one line on stderr says why).
# A failed merge leaves the content tree valid: what was merged stays, nothing is half-written.

set -o errexit -o nounset -o pipefail

readonly SYSTEM_DEFAULT_REGISTRY=bootstrap-registry.airgap
readonly K3S_MEDIA_FILES="install.sh minimal-registry.service registries.yaml"
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
REPLACE=false
WITH_REGISTRY=false
IMAGES_ONLY=false
LISTED=" "
K3S_FILE=
REGISTRY_FILE=
TOOL=
TOOL_TMP=
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
            --replace) REPLACE=true ;;
            --registry) WITH_REGISTRY=true ;;
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
    LISTED=${listed}
    # Images-only media (make-airgap-media.sh --images-only) carry no K3s at all.
    case "${listed}" in
        *" install.sh "* | *" k3s "* | *" k3s-"*) ;;
        *) IMAGES_ONLY=true ;;
    esac
    if [ "${IMAGES_ONLY}" = false ]; then
        for name in ${K3S_MEDIA_FILES}; do
            require_on_media "${name}"
        done
    fi
    [ -n "${ARCHIVE}" ] || fatal "the media holds no registry.tar.gz or registry.tar.zst"
    if [ "${ARCHIVE}" = registry.tar.zst ] && ! command -v zstd >/dev/null 2>&1; then
        fatal "registry.tar.zst needs zstd, which this node lacks; write the media without --zstd"
    fi
    info "media checked: every file matches SHA256SUMS"
}

on_media() {
    case "${LISTED}" in
        *" $1 "*) return 0 ;;
        *) return 1 ;;
    esac
}

require_on_media() {
    on_media "$1" || fatal "$1 is not on the media (or not in SHA256SUMS); write it again with make-airgap-media.sh"
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

# The architectures a media for several holds: those of its minimal-registry-linux-ARCH.
media_arches() {
    local name arches=
    for name in ${LISTED}; do
        case "${name}" in
            minimal-registry-linux-*) arches="${arches:+${arches} }${name#minimal-registry-linux-}" ;;
        esac
    done
    printf '%s' "${arches}"
}

# Pick this node's binaries: K3s's release names (k3s for amd64, k3s-ARCH otherwise) and
# minimal-registry-linux-ARCH on media for several architectures; k3s and minimal-registry
# on media for one. Refuse an architecture the media lacks.
verify_arch() {
    local machine media_arch arches
    machine=${INSTALL_NODE_ARCH:-$(uname -m)}
    case "${machine}" in
        x86_64 | amd64) NODE_ARCH=amd64 ;;
        aarch64 | arm64) NODE_ARCH=arm64 ;;
        *) NODE_ARCH=${machine} ;;
    esac
    arches=$(media_arches)
    if [ -n "${arches}" ]; then
        on_media "minimal-registry-linux-${NODE_ARCH}" \
            || fatal "this node is ${NODE_ARCH} and the media holds only ${arches}: write media with --arch ${arches// /,},${NODE_ARCH}"
        REGISTRY_FILE=minimal-registry-linux-${NODE_ARCH}
        K3S_FILE=k3s
        [ "${NODE_ARCH}" = amd64 ] || K3S_FILE=k3s-${NODE_ARCH}
        if [ "${IMAGES_ONLY}" = false ]; then
            on_media "${K3S_FILE}" || fatal "this node is ${NODE_ARCH} and the media holds no ${K3S_FILE}: write media with --arch ${NODE_ARCH}"
        fi
    else
        require_on_media minimal-registry
        REGISTRY_FILE=minimal-registry
        K3S_FILE=k3s
        [ "${IMAGES_ONLY}" = true ] || require_on_media k3s
    fi
    if [ "${IMAGES_ONLY}" = true ]; then
        media_arch=$(elf_arch "${MEDIA}/${REGISTRY_FILE}")
        [ "${media_arch}" != not-elf ] || media_arch=${NODE_ARCH}
    else
        media_arch=$(elf_arch "${MEDIA}/${K3S_FILE}")
    fi
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
    if [ "${IMAGES_ONLY}" = true ] && [ "${WITH_REGISTRY}" = false ]; then
        return 0
    fi
    if install_file "${MEDIA}/${REGISTRY_FILE}" "$(target "${BIN_DIR}/minimal-registry")" 0755; then
        changed "installed ${BIN_DIR}/minimal-registry"
        REGISTRY_CHANGED=true
    else
        unchanged "installed ${BIN_DIR}/minimal-registry"
    fi
}

install_unit() {
    [ "${IMAGES_ONLY}" = false ] || return 0
    if install_file "${MEDIA}/minimal-registry.service" "$(target "${UNIT_DIR}/minimal-registry.service")" 0644; then
        changed "installed ${UNIT_DIR}/minimal-registry.service"
        REGISTRY_CHANGED=true
        UNITS_CHANGED=true
    else
        unchanged "installed ${UNIT_DIR}/minimal-registry.service"
    fi
}

# --- step: content ---

# The media's minimal-registry, copied where it can run: the unit's cache directory (the
# media may be mounted noexec, and so may /tmp, where a one-file binary unpacks itself).
# Sets TOOL; returns 1 when it cannot run on this machine.
prepare_tool() {
    local cache
    [ -z "${TOOL}" ] || return 0
    cache=$(target "${CACHE_DIR}")
    mkdir -p -- "${cache}"
    chmod 0700 -- "${cache}"
    TOOL_DIR=$(mktemp -d "${cache}/.install-node.XXXXXX")
    cp -- "${MEDIA}/${REGISTRY_FILE}" "${TOOL_DIR}/minimal-registry"
    chmod 0755 -- "${TOOL_DIR}/minimal-registry"
    TOOL_TMP=${cache}
    if ! TMPDIR=${TOOL_TMP} "${TOOL_DIR}/minimal-registry" --version >/dev/null 2>&1; then
        return 1
    fi
    TOOL=${TOOL_DIR}/minimal-registry
}

registry_tool() {
    TMPDIR=${TOOL_TMP} "${TOOL}" "$@"
}

decompress_archive() {
    case "${ARCHIVE}" in
        registry.tar.gz) gzip -dc -- "${MEDIA}/${ARCHIVE}" ;;
        registry.tar.zst) zstd -dcq -- "${MEDIA}/${ARCHIVE}" ;;
    esac
}

# Room to unpack the archive in DIR: its unpacked size (counted by reading it: gzip's own
# record of it wraps at 4 GiB) and 16 MiB to spare.
verify_space() {
    local directory=$1 need available
    need=$(decompress_archive | wc -c) || fatal "cannot read ${ARCHIVE}"
    need=$((need + 16777216))
    available=$(df -P -k -- "${directory}" | awk 'NR == 2 { print $4 }')
    available=$((available * 1024))
    if [ "${available}" -lt "${need}" ]; then
        fatal "not enough space in ${directory#"${ROOT}"}: ${ARCHIVE} needs $((need / 1048576)) MiB unpacked, $((available / 1048576)) MiB free; nothing was changed"
    fi
}

# "name:tag sha256:..." for every tag of a tree, sorted: what the node serves.
tag_list() {
    local tree=$1 path relative digest
    [ -d "${tree}" ] || return 0
    find "${tree}" -mindepth 3 -path '*/manifests/*' ! -name 'sha256:*' \( -type l -o -type f \) -print \
        | while IFS= read -r path; do
            relative=${path#"${tree}"/}
            # Dot names are never content: an import's staging (`.import-*`), a temporary file.
            case "/${relative}" in */.*) continue ;; esac
            if [ -L "${path}" ]; then
                digest=$(readlink -- "${path}")
                digest=${digest##*/}
            else
                digest=$(sha256sum <"${path}")
                digest="sha256:${digest%% *}"
            fi
            printf '%s:%s %s\n' "${relative%/manifests/*}" "${relative##*/}" "${digest}"
        done | LC_ALL=C sort
}

# What changed between two tag lists (files): re-pointed and added tags, one line each.
# Prints nothing when nothing did.
tag_changes() {
    awk 'NR == FNR { before[$1] = $2; next }
         !($1 in before) { print "added " $1; next }
         before[$1] != $2 { print "re-pointed " $1 ": " before[$1] " -> " $2 }' "$1" "$2"
}

# Tags of the first list that the second lacks: what --replace deletes.
tags_missing_from() {
    awk 'NR == FNR { kept[$1] = 1; next } !($1 in kept) { print $1 }' "$2" "$1"
}

# The installed tree's problems (`minimal-registry verify`), one line each; empty when sound.
tree_problems() {
    local output code=0
    output=$(registry_tool verify -q -d "$1") || code=$?
    case "${code}" in
        0 | 1)
            local line
            while IFS= read -r line; do
                case "${line}" in
                    "PROBLEM ${ROOT}"*) printf 'PROBLEM %s\n' "${line#"PROBLEM ${ROOT}"}" ;;
                    "PROBLEM "*) printf '%s\n' "${line}" ;;
                esac
            done <<<"${output}"
            ;;
        *) fatal "cannot check the installed content tree $1 (minimal-registry verify exit ${code})" ;;
    esac
}

write_stamp() {
    local stamp
    stamp=$(target "${CONTENT_STAMP}")
    printf '%s\n' "${ARCHIVE_SHA256}" >"${stamp}.new"
    mv -f -- "${stamp}.new" "${stamp}"
}

# The media's tree into the node's: a new tree, a merge, or (--replace) a swap.
install_content() {
    local content
    content=$(target "${CONTENT_DIR}")
    if [ -d "${content}" ] && [ "${REPLACE}" = false ]; then
        merge_content "${content}"
    else
        fresh_content "${content}"
    fi
}

merge_content() {
    local content=$1 stamp problems before after changes
    stamp=$(target "${CONTENT_STAMP}")
    prepare_tool || fatal "the media's ${REGISTRY_FILE} cannot run here, and merging needs it; --replace swaps the tree without it"
    info "checking the installed content tree (minimal-registry verify)"
    problems=$(tree_problems "${content}")
    if [ -z "${problems}" ] && [ -f "${stamp}" ] && [ "$(cat -- "${stamp}")" = "${ARCHIVE_SHA256}" ]; then
        unchanged "merged ${ARCHIVE} into ${CONTENT_DIR}"
        info "content tree intact, and it already holds the images of ${ARCHIVE}"
        return
    fi
    if [ -n "${problems}" ]; then
        warn "the installed content tree is damaged; repairing what the media holds:"
        printf '%s\n' "${problems}" | sed 's/^/[WARN]    /' >&2
    fi
    verify_space "${content}"
    before=${TMP_DIR}/tags.before
    after=${TMP_DIR}/tags.after
    tag_list "${content}" >"${before}"
    info "merging ${ARCHIVE} into ${CONTENT_DIR} (images the media lacks stay)"
    registry_tool import -q -d "${content}" "${MEDIA}/${ARCHIVE}" \
        || fatal "merging ${ARCHIVE} into ${CONTENT_DIR} failed (see above); the tree is valid, with what was merged so far"
    tag_list "${content}" >"${after}"
    changes=$(tag_changes "${before}" "${after}")
    if [ -n "${changes}" ]; then
        printf '%s\n' "${changes}" | while IFS= read -r line; do info "  ${line}"; done
    fi
    write_stamp
    if [ -n "${problems}" ]; then
        local left
        left=$(tree_problems "${content}")
        if [ -z "${left}" ]; then
            changed "repaired ${CONTENT_DIR}: $(printf '%s\n' "${problems}" | wc -l) problems fixed from ${ARCHIVE}"
            printf '%s\n' "${problems}" | sed 's/^PROBLEM /repaired: /' | while IFS= read -r line; do info "  ${line}"; done
        else
            warn "still damaged after the merge (the media does not hold these, or did not replace them): remove the images with minimal-registry rm, or bring media that holds them:"
            printf '%s\n' "${left}" | sed 's/^/[WARN]    /' >&2
            changed "repaired ${CONTENT_DIR} in part"
        fi
    fi
    if [ -n "${changes}" ]; then
        changed "merged ${ARCHIVE} into ${CONTENT_DIR}: $(printf '%s\n' "${changes}" | grep -c '^added') added, $(printf '%s\n' "${changes}" | grep -c '^re-pointed') re-pointed"
    elif [ -z "${problems}" ]; then
        unchanged "merged ${ARCHIVE} into ${CONTENT_DIR}"
        info "the content tree already held every image of ${ARCHIVE}"
    fi
}

# Build the media's tree beside the final place, then move it in (swapping out the old one
# for --replace, after listing what goes). Checked by importing it when the media's
# minimal-registry runs here; else only unpacked (under --root for another architecture).
fresh_content() {
    local content=$1 parent old gone
    parent=$(dirname "${content}")
    mkdir -p -- "${parent}"
    verify_space "${parent}"
    STAGING=$(mktemp -d "${parent}/.registry.new.XXXXXX")
    if prepare_tool; then
        info "importing ${ARCHIVE} (every blob and manifest checked against its digest)"
        registry_tool import -q -d "${STAGING}/registry" "${MEDIA}/${ARCHIVE}" \
            || fatal "the content tree in ${ARCHIVE} does not import cleanly (see above); nothing was installed"
    else
        warn "the media's ${REGISTRY_FILE} cannot run on this machine: content tree unpacked, not checked"
        decompress_archive | tar -x -f - -C "${STAGING}" --no-same-owner \
            || fatal "cannot unpack ${ARCHIVE} into ${parent} (is the disk full?)"
        [ -d "${STAGING}/registry/blobs" ] || fatal "${ARCHIVE} holds no registry/blobs: not a content tree"
    fi
    if [ -e "${content}" ]; then
        gone=$(tags_missing_from <(tag_list "${content}") <(tag_list "${STAGING}/registry"))
        if [ -n "${gone}" ]; then
            warn "--replace deletes these $(printf '%s\n' "${gone}" | wc -l) images, which the media lacks:"
            printf '%s\n' "${gone}" | sed 's/^/[WARN]    /' >&2
        else
            info "--replace: every image on the node is on the media too"
        fi
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
    write_stamp
    changed "installed ${CONTENT_DIR} ($(tag_list "${content}" | wc -l) images from ${ARCHIVE})"
}

install_registries_yaml() {
    [ "${IMAGES_ONLY}" = false ] || return 0
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
    [ "${SKIP_K3S}" = false ] && [ "${IMAGES_ONLY}" = false ] || return 0
    if install_file "${MEDIA}/${K3S_FILE}" "$(target "${BIN_DIR}/k3s")" 0755; then
        changed "installed ${BIN_DIR}/k3s"
    else
        unchanged "installed ${BIN_DIR}/k3s"
    fi
}

# A default route through a dummy interface, applied at every boot before K3s.
install_dummy_route() {
    [ "${DUMMY_ROUTE}" = true ] && [ "${IMAGES_ONLY}" = false ] || return 0
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
    [ "${IMAGES_ONLY}" = false ] || return 0
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
    if [ "${IMAGES_ONLY}" = true ]; then
        # The running server serves the merged images at once; only a new binary needs a restart.
        if [ "${REGISTRY_CHANGED}" = true ] && systemctl is-active --quiet minimal-registry.service; then
            info "restarting minimal-registry (binary changed)"
            systemctl restart minimal-registry.service
            wait_for_registry
        fi
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
    [ "${SKIP_K3S}" = false ] && [ "${IMAGES_ONLY}" = false ] || return 0
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
    if [ "${IMAGES_ONLY}" = true ]; then
        local binary="minimal-registry not touched (--registry installs it)"
        [ "${WITH_REGISTRY}" = false ] || binary="minimal-registry from the media"
        info "images-only media: merged its images; ${binary}; K3s, install.sh, registries.yaml and the units not touched"
    fi
    if [ "${#CHANGED[@]}" -eq 0 ]; then
        info "nothing to do: everything on the media was already installed"
    else
        local IFS=,
        info "done (${#CHANGED[@]} changed, ${#UNCHANGED[@]} already right):${CHANGED[*]/#/ }"
    fi
}

# --- main ---
main() {
    trap cleanup EXIT
    parse_args "$@"
    verify_system
    verify_agent_settings
    verify_media
    verify_arch
    TMP_DIR=$(mktemp -d)
    install_content
    install_binary
    install_unit
    install_registries_yaml
    install_k3s_binary
    install_dummy_route
    enable_units
    start_registry
    run_k3s_install
    summary
}

main "$@"
