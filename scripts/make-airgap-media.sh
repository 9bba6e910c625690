#!/usr/bin/env bash
# make-airgap-media.sh: on a connected host, write everything an air-gapped K3s node needs
# onto removable media (a mounted USB stick, a directory to burn), for one architecture or
# several, or (--images-only) only images to add to running nodes.
#
#   scripts/make-airgap-media.sh -o DIR (-r REGISTRY_DIR | -b BUNDLE) [OPTIONS]
#
# The media then holds, and nothing else of ours:
#   install.sh               K3s's installer
#   k3s                      the K3s binary for the architecture
#   registry.tar.gz          the content tree as registry/ (registry.tar.zst with --zstd):
#                            sorted names, owner 0, fixed mtime, `gzip -n`, so the same tree
#                            gives the same bytes
#   minimal-registry         the registry binary for the architecture
#   minimal-registry.service its systemd unit
#   registries.yaml          for /etc/rancher/k3s/
#   install-node.sh          what the operator runs on the node
#   README.txt               the node's steps
#   SHA256SUMS               sha256 of every file above; install-node.sh checks it first
#
# With --arch amd64,arm64 (one media for a mixed cluster) the binaries go under the names of
# K3s's releases: k3s and k3s-arm64, minimal-registry-linux-amd64 and
# minimal-registry-linux-arm64; install-node.sh picks by the node's `uname -m`. The tree is
# one for all (download it with -p linux/amd64,linux/arm64).
# With --images-only the media holds only registry.tar.gz, minimal-registry (per
# architecture as above), install-node.sh, README.txt and SHA256SUMS: install-node.sh then
# merges the images into a running node and touches nothing of K3s.
#
# Before writing, it checks that every input exists and is for the architecture (ELF header),
# that the content tree passes `minimal-registry verify --fast` (a bundle: that it is a
# complete archive of registry/), and that the media has room. Files are written under a
# temporary name on the media and renamed; a re-run replaces only the files whose bytes
# changed (and says "nothing to do" when none did), then syncs the media.
#
# Options:
#   -o DIR           the media directory (created if missing; not inside the content tree)
#   -r DIR           the content tree to pack (from download-system-images.sh); an
#                    interrupted import's .import-* and .tmp-* leftovers are not packed
#   -b FILE          an existing bundle (registry.tar.gz or registry.tar.zst) to copy as is
#   --arch ARCHES    amd64, arm64, or both as amd64,arm64 (default: this host's)
#   --images-only    images only: no k3s, install.sh, unit or registries.yaml
#   -v VERSION       K3s version, e.g. v1.31.4+k3s1, or stable / latest (resolved through
#                    the channel server; needs --download). Names the download and README.txt
#   -k FILE          the k3s binary (default: the download cache's, see --download); for
#                    several architectures give one -k per architecture (told by its ELF header)
#   -i FILE          K3s's install.sh (default: the download cache's)
#   -m FILE          the minimal-registry binary (default: dist/minimal-registry-linux-ARCH);
#                    one -m per architecture, as -k
#   -y FILE          registries.yaml (default: the one beside the tree or bundle, as
#                    download-system-images.sh writes it; else packaging/registries.yaml)
#   --zstd           write registry.tar.zst (needs zstd here, and on the node)
#   --download       fetch what is missing of k3s, sha256sum-ARCH.txt and install.sh into the
#                    cache, and check k3s against sha256sum-ARCH.txt (a -k file too)
#   --cache DIR      the download cache (default: ${XDG_CACHE_HOME:-~/.cache}/minimal-registry/k3s)
#   --allow-script   accept a script as minimal-registry (development and tests: the node then
#                    needs its interpreter)
#   -h, --help       show this help
#
# Environment:
#   K3S_RELEASE_URL            release downloads; files are K3S_RELEASE_URL/VERSION/NAME
#                              (default: https://github.com/k3s-io/k3s/releases/download)
#   K3S_CHANNEL_URL            channel server resolving stable / latest
#                              (default: https://update.k3s.io/v1-release/channels)
#   K3S_INSTALL_SCRIPT_URL     install.sh (default: https://get.k3s.io)
#   K3S_INSTALL_SCRIPT_SHA256  the sha256 install.sh must have; K3s publishes none, so
#                              without it the script is only checked to be a shell script
#   MINIMAL_REGISTRY_BIN       a minimal-registry runnable on this host, for `verify`
#                              (default: -m's binary when it runs here, else minimal-registry
#                              on PATH, else `python3 -m minimal_registry` from this checkout)
#   MINIMAL_REGISTRY_CMD       the same as a command line (as download-system-images.sh
#                              takes it), when MINIMAL_REGISTRY_BIN is not set
#   PYTHON                     the python3 for that last case (default: python3)
#   SOURCE_DATE_EPOCH          mtime of every archive member (default: 0)
#   TMPDIR                     scratch space (small files only)
#
# Exit status: 0 written (or nothing to do), 1 failed (one line on stderr says why).

set -o errexit -o nounset -o pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT_DIR
readonly DEFAULT_RELEASE_URL=https://github.com/k3s-io/k3s/releases/download
readonly DEFAULT_CHANNEL_URL=https://update.k3s.io/v1-release/channels
readonly DEFAULT_INSTALL_SCRIPT_URL=https://get.k3s.io

OUT=
TREE=
BUNDLE=
ARCH=
ARCHES=()
IMAGES_ONLY=false
K3S_GIVEN=()
REGISTRY_GIVEN=()
declare -A K3S_BINS=()
declare -A REGISTRY_BINS=()
VERSION=
K3S_BIN=
INSTALL_SH=
REGISTRY_BIN=
REGISTRIES_YAML=
ZSTD=false
DOWNLOAD=false
CACHE=
ALLOW_SCRIPT=false
ARCHIVE=
TMP_DIR=
STAGE=
REGISTRY_TOOL=()
WRITTEN=()

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

cleanup() {
    local code=$?
    trap - EXIT
    [ -z "${STAGE}" ] || rm -rf -- "${STAGE}"
    [ -z "${TMP_DIR}" ] || rm -rf -- "${TMP_DIR}"
    exit "${code}"
}

need_value() {
    [ "$2" -ge 2 ] || fatal "$1 needs a value (see --help)"
}

# Refuse, before anything is written, values that would break a later step half-way: an
# option where a value belongs (`-o -x`), a newline or tab in a path (the media's file list
# is NAME<TAB>PATH lines). Arguments: FLAG VALUE pairs; empty values are not given.
verify_arg_values() {
    local flag value shown
    while [ "$#" -ge 2 ]; do
        flag=$1
        value=$2
        shift 2
        shown=${value//$'\n'/\\n}
        shown=${shown//$'\t'/\\t}
        case "${value}" in
            -*) fatal "${flag} needs a value, not the option '${value}' (write ./${value} for a path starting with -)" ;;
            *$'\n'* | *$'\t'*) fatal "${flag} '${shown}' has a newline or tab in its name: rename it" ;;
        esac
    done
}

# An absolute path for PATH, relative to where the script was started (so that `-m
# minimal-registry` is that file, never a command found on PATH).
absolute_path() {
    case "$1" in
        /* | "") printf '%s' "$1" ;;
        *) printf '%s/%s' "${PWD}" "$1" ;;
    esac
}

# The physical path of PATH, which may not exist yet: its deepest existing directory with
# symlinks resolved, then the rest as given.
physical_path() {
    local path=$1 rest=
    while [ "${path}" != / ] && [ "${path%/}" != "${path}" ]; do
        path=${path%/}
    done
    while [ ! -d "${path}" ]; do
        rest=/${path##*/}${rest}
        path=$(dirname -- "${path}")
    done
    printf '%s%s' "$(cd -P -- "${path}" && pwd -P)" "${rest}"
}

# The media must not be the content tree or inside it: the archive would pack itself.
verify_media_outside_tree() {
    local media
    media=$(physical_path "${OUT}")
    case "${media}/" in
        "${TREE}/"*) fatal "the media directory ${OUT} is inside the content tree ${TREE}: give -o outside it" ;;
    esac
}

# --- step: arguments ---
parse_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -o) need_value "$1" "$#"; OUT=$2; shift ;;
            -r) need_value "$1" "$#"; TREE=$2; shift ;;
            -b) need_value "$1" "$#"; BUNDLE=$2; shift ;;
            --arch) need_value "$1" "$#"; ARCH=$2; shift ;;
            --arch=*) ARCH=${1#*=} ;;
            -v) need_value "$1" "$#"; VERSION=$2; shift ;;
            -k) need_value "$1" "$#"; K3S_GIVEN+=("$2"); shift ;;
            -i) need_value "$1" "$#"; INSTALL_SH=$2; shift ;;
            -m) need_value "$1" "$#"; REGISTRY_GIVEN+=("$2"); shift ;;
            -y) need_value "$1" "$#"; REGISTRIES_YAML=$2; shift ;;
            --zstd) ZSTD=true ;;
            --images-only) IMAGES_ONLY=true ;;
            --download) DOWNLOAD=true ;;
            --cache) need_value "$1" "$#"; CACHE=$2; shift ;;
            --cache=*) CACHE=${1#*=} ;;
            --allow-script) ALLOW_SCRIPT=true ;;
            -h | --help) usage; exit 0 ;;
            *) fatal "unknown argument '$1' (see --help)" ;;
        esac
        shift
    done
    [ -n "${OUT}" ] || fatal "give the media directory with -o DIR"
    local given=() file
    for file in "${K3S_GIVEN[@]}"; do given+=(-k "${file}"); done
    for file in "${REGISTRY_GIVEN[@]}"; do given+=(-m "${file}"); done
    verify_arg_values -o "${OUT}" -r "${TREE}" -b "${BUNDLE}" -i "${INSTALL_SH}" \
        -y "${REGISTRIES_YAML}" --cache "${CACHE}" -v "${VERSION}" "${given[@]}"
    if [ -n "${TREE}" ] && [ -n "${BUNDLE}" ]; then
        fatal "give either a content tree (-r DIR) or a bundle (-b FILE), not both"
    fi
    [ -n "${TREE}${BUNDLE}" ] || fatal "give the content tree with -r DIR (or a bundle with -b FILE)"
    if [ -z "${ARCH}" ]; then
        case "$(uname -m)" in
            x86_64) ARCH=amd64 ;;
            aarch64) ARCH=arm64 ;;
            *) fatal "cannot tell the architecture from $(uname -m): give --arch amd64|arm64" ;;
        esac
    fi
    local arch
    IFS=, read -r -a ARCHES <<<"${ARCH}"
    [ "${#ARCHES[@]}" -gt 0 ] || fatal "--arch must be amd64 or arm64, or amd64,arm64; not '${ARCH}'"
    for arch in "${ARCHES[@]}"; do
        case "${arch}" in
            amd64 | arm64) ;;
            *) fatal "--arch must be amd64 or arm64, or amd64,arm64; not '${ARCH}'" ;;
        esac
    done
    [ "$(printf '%s\n' "${ARCHES[@]}" | sort -u | wc -l)" -eq "${#ARCHES[@]}" ] || fatal "--arch names an architecture twice: '${ARCH}'"
    ARCH=${ARCHES[0]}
    if [ -z "${VERSION}" ] && [ "${DOWNLOAD}" = true ]; then
        VERSION=stable
    fi
    case "${VERSION}" in
        "" | stable | latest) ;;
        *) is_version "${VERSION}" || fatal "-v takes a K3s version like v1.31.4+k3s1, or stable or latest; not '${VERSION}'" ;;
    esac
    if [ "${VERSION}" = stable ] || [ "${VERSION}" = latest ]; then
        [ "${DOWNLOAD}" = true ] || fatal "-v ${VERSION} is resolved through the network: add --download, or give the version"
    fi
    CACHE=${CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/minimal-registry/k3s}
    if [ "${IMAGES_ONLY}" = true ] && [ "${#K3S_GIVEN[@]}" -gt 0 ]; then
        fatal "--images-only media hold no k3s: leave out -k"
    fi
    OUT=$(absolute_path "${OUT}")
    TREE=$(absolute_path "${TREE}")
    BUNDLE=$(absolute_path "${BUNDLE}")
    INSTALL_SH=$(absolute_path "${INSTALL_SH}")
    REGISTRIES_YAML=$(absolute_path "${REGISTRIES_YAML}")
    CACHE=$(absolute_path "${CACHE}")
    local index
    for index in "${!K3S_GIVEN[@]}"; do
        K3S_GIVEN[index]=$(absolute_path "${K3S_GIVEN[index]}")
    done
    for index in "${!REGISTRY_GIVEN[@]}"; do
        REGISTRY_GIVEN[index]=$(absolute_path "${REGISTRY_GIVEN[index]}")
    done
}

# A K3s version: v, a digit, then only what release names hold (v1.31.4+k3s1, v1.30.0-rc1+k3s1).
# Anything else would reach sed, URLs and cache paths.
is_version() {
    [[ "$1" =~ ^v[0-9][0-9A-Za-z.+-]*$ ]] && [[ "$1" != *..* ]]
}

multi_arch() { [ "${#ARCHES[@]}" -gt 1 ]; }

# --- step: tools ---
verify_tools() {
    local tool
    for tool in tar gzip sha256sum cmp od df find; do
        command -v "${tool}" >/dev/null 2>&1 || fatal "${tool} is needed and not installed"
    done
    tar --version 2>/dev/null | grep -q 'GNU tar' || fatal "GNU tar is needed (for --sort=name)"
    if [ "${ZSTD}" = true ] && [ -n "${TREE}" ]; then
        command -v zstd >/dev/null 2>&1 || fatal "--zstd needs zstd (apt-get install zstd)"
    fi
    if [ "${DOWNLOAD}" = true ]; then
        command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 \
            || fatal "--download needs curl or wget"
    fi
}

# The ELF machine of a file: amd64, arm64, or what it is otherwise.
# (install-node.sh has the same function: it must stand alone on the media.)
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

sha256_of() {
    local sum
    sum=$(sha256sum -- "$1")
    printf '%s' "${sum%% *}"
}

# --- step: downloads ---
fetch() {
    local url=$1 dest=$2
    info "downloading ${url}"
    if command -v curl >/dev/null 2>&1; then
        curl --fail --silent --show-error --location --retry 3 --connect-timeout 20 \
            -o "${dest}" -- "${url}" || fatal "download failed: ${url}"
    else
        wget -q -O "${dest}" -- "${url}" || fatal "download failed: ${url}"
    fi
}

resolve_version() {
    case "${VERSION}" in
        stable | latest) ;;
        *) return 0 ;;
    esac
    local url=${K3S_CHANNEL_URL:-${DEFAULT_CHANNEL_URL}}/${VERSION} effective
    command -v curl >/dev/null 2>&1 || fatal "resolving -v ${VERSION} needs curl; give the version instead"
    effective=$(curl --fail --silent --show-error --location --max-time 60 \
        -o /dev/null -w '%{url_effective}' -- "${url}") || fatal "cannot resolve the ${VERSION} K3s version from ${url}"
    effective=${effective##*/}
    effective=${effective//%2B/+}
    is_version "${effective}" || fatal "the channel ${url} did not lead to a version (got '${effective}')"
    info "K3s ${VERSION} is ${effective}"
    VERSION=${effective}
}

# The name K3s releases the binary under for an architecture (and for ARCH).
k3s_release_name() {
    if [ "$1" = amd64 ]; then printf 'k3s'; else printf 'k3s-%s' "$1"; fi
}

k3s_asset() {
    k3s_release_name "${ARCH}"
}

# Fill the cache with whatever is missing of k3s, its checksums and install.sh; check k3s.
download_release() {
    local dir asset release sums expected line
    [ "${DOWNLOAD}" = true ] || return 0
    resolve_version
    dir=${CACHE}/${VERSION}/${ARCH}
    mkdir -p -- "${dir}"
    asset=$(k3s_asset)
    release=${K3S_RELEASE_URL:-${DEFAULT_RELEASE_URL}}/${VERSION//+/%2B}
    sums=${dir}/sha256sum-${ARCH}.txt
    if [ ! -s "${sums}" ]; then
        fetch "${release}/sha256sum-${ARCH}.txt" "${TMP_DIR}/sums"
        mv -- "${TMP_DIR}/sums" "${sums}"
    fi
    line=$(grep -E "^[0-9a-f]{64}[[:blank:]]+\*?${asset}\$" "${sums}" | head -n 1) || true
    expected=${line%%[[:blank:]]*}
    [ -n "${expected}" ] || fatal "${sums} lists no ${asset}: is ${VERSION} a K3s release?"

    K3S_BIN=${K3S_BIN:-${dir}/${asset}}
    if [ ! -f "${K3S_BIN}" ]; then
        fetch "${release}/${asset}" "${TMP_DIR}/k3s"
        local actual
        actual=$(sha256_of "${TMP_DIR}/k3s")
        [ "${actual}" = "${expected}" ] \
            || fatal "checksum mismatch for ${release}/${asset}: sha256 ${actual}, sha256sum-${ARCH}.txt says ${expected}"
        chmod 0755 -- "${TMP_DIR}/k3s"
        mv -- "${TMP_DIR}/k3s" "${K3S_BIN}"
    fi
    local actual
    actual=$(sha256_of "${K3S_BIN}")
    [ "${actual}" = "${expected}" ] \
        || fatal "checksum mismatch: ${K3S_BIN} has sha256 ${actual}, sha256sum-${ARCH}.txt of ${VERSION} says ${expected}"
    info "k3s ${VERSION} ${ARCH} matches sha256sum-${ARCH}.txt"

    INSTALL_SH=${INSTALL_SH:-${CACHE}/${VERSION}/install.sh}
    if [ ! -f "${INSTALL_SH}" ]; then
        fetch "${K3S_INSTALL_SCRIPT_URL:-${DEFAULT_INSTALL_SCRIPT_URL}}" "${TMP_DIR}/install.sh"
        verify_install_script "${TMP_DIR}/install.sh"
        mv -- "${TMP_DIR}/install.sh" "${INSTALL_SH}"
    fi
}

verify_install_script() {
    local script=$1 actual
    if [ -n "${K3S_INSTALL_SCRIPT_SHA256:-}" ]; then
        actual=$(sha256_of "${script}")
        [ "${actual}" = "${K3S_INSTALL_SCRIPT_SHA256}" ] \
            || fatal "checksum mismatch for install.sh: sha256 ${actual}, K3S_INSTALL_SCRIPT_SHA256 says ${K3S_INSTALL_SCRIPT_SHA256}"
    fi
    [ "$(head -c 2 -- "${script}")" = '#!' ] || fatal "${script} is not a shell script (an error page?)"
}

# --- step: inputs ---

# Which -k and -m file is for which architecture: with one --arch, the last given (checked
# against it later); with several, each ELF file's own header says (a script given as
# minimal-registry with --allow-script stands for the architectures no ELF file claims).
assign_given() {
    local file arch
    if ! multi_arch; then
        [ "${#K3S_GIVEN[@]}" -eq 0 ] || K3S_BINS[${ARCH}]=${K3S_GIVEN[-1]}
        [ "${#REGISTRY_GIVEN[@]}" -eq 0 ] || REGISTRY_BINS[${ARCH}]=${REGISTRY_GIVEN[-1]}
        return
    fi
    for file in "${K3S_GIVEN[@]}"; do
        [ -f "${file}" ] || fatal "k3s binary ${file} does not exist"
        arch=$(elf_arch "${file}")
        arch_wanted "${arch}" || fatal "${file} is ${arch}, which --arch ${ARCHES[*]} does not name: the wrong k3s binary"
        K3S_BINS[${arch}]=${file}
    done
    for file in "${REGISTRY_GIVEN[@]}"; do
        [ -f "${file}" ] || fatal "minimal-registry binary ${file} does not exist"
        arch=$(elf_arch "${file}")
        [ "${arch}" != not-elf ] || continue
        arch_wanted "${arch}" || fatal "${file} is ${arch}, which --arch ${ARCHES[*]} does not name: the wrong minimal-registry binary"
        REGISTRY_BINS[${arch}]=${file}
    done
    for file in "${REGISTRY_GIVEN[@]}"; do
        [ "$(elf_arch "${file}")" = not-elf ] || continue
        for arch in "${ARCHES[@]}"; do
            [ -n "${REGISTRY_BINS[${arch}]:-}" ] || REGISTRY_BINS[${arch}]=${file}
        done
    done
}

arch_wanted() {
    local arch
    for arch in "${ARCHES[@]}"; do
        [ "${arch}" != "$1" ] || return 0
    done
    return 1
}

# Fetch (--download) and check each architecture's binaries, by the per-architecture steps.
prepare_binaries() {
    local arch
    assign_given
    for arch in "${ARCHES[@]}"; do
        ARCH=${arch}
        K3S_BIN=${K3S_BINS[${arch}]:-}
        REGISTRY_BIN=${REGISTRY_BINS[${arch}]:-${ROOT_DIR}/dist/minimal-registry-linux-${arch}}
        if [ "${IMAGES_ONLY}" = false ]; then
            download_release
            verify_k3s_binary
            K3S_BINS[${arch}]=${K3S_BIN}
        fi
        verify_registry_binary
        REGISTRY_BINS[${arch}]=${REGISTRY_BIN}
    done
    ARCH=${ARCHES[0]}
}

verify_k3s_binary() {
    if [ -z "${K3S_BIN}" ]; then
        if [ -n "${VERSION}" ] && [ -f "${CACHE}/${VERSION}/${ARCH}/$(k3s_asset)" ]; then
            K3S_BIN=${CACHE}/${VERSION}/${ARCH}/$(k3s_asset)
        else
            fatal "no k3s binary for ${ARCH}: give -k FILE, or -v VERSION --download"
        fi
    fi
    [ -f "${K3S_BIN}" ] || fatal "k3s binary ${K3S_BIN} does not exist"
    local arch
    arch=$(elf_arch "${K3S_BIN}")
    [ "${arch}" != not-elf ] || fatal "${K3S_BIN} is not an ELF executable: not a k3s binary"
    [ "${arch}" = "${ARCH}" ] || fatal "${K3S_BIN} is ${arch}, not ${ARCH}: the wrong k3s binary"
}

verify_registry_binary() {
    [ -f "${REGISTRY_BIN}" ] || fatal "minimal-registry binary ${REGISTRY_BIN} does not exist (build it with scripts/build-binary.sh ${ARCH}, or give -m FILE)"
    local arch
    arch=$(elf_arch "${REGISTRY_BIN}")
    if [ "${arch}" = not-elf ] && [ "$(head -c 2 -- "${REGISTRY_BIN}")" = '#!' ]; then
        [ "${ALLOW_SCRIPT}" = true ] \
            || fatal "${REGISTRY_BIN} is a script, not the one-file binary (--allow-script accepts one, for development)"
        warn "${REGISTRY_BIN} is a script, not the one-file binary (--allow-script)"
    elif [ "${arch}" = not-elf ]; then
        fatal "${REGISTRY_BIN} is not an ELF executable: not a minimal-registry binary"
    elif [ "${arch}" != "${ARCH}" ]; then
        fatal "${REGISTRY_BIN} is ${arch}, not ${ARCH}: the wrong minimal-registry binary"
    fi
}

verify_inputs() {
    if [ "${IMAGES_ONLY}" = false ] && [ -z "${INSTALL_SH}" ]; then
        if [ -n "${VERSION}" ] && [ -f "${CACHE}/${VERSION}/install.sh" ]; then
            INSTALL_SH=${CACHE}/${VERSION}/install.sh
        else
            fatal "no install.sh: give -i FILE, or --download"
        fi
    fi
    if [ "${IMAGES_ONLY}" = false ]; then
        [ -f "${INSTALL_SH}" ] || fatal "install.sh ${INSTALL_SH} does not exist"
        verify_install_script "${INSTALL_SH}"
    fi

    if [ -n "${TREE}" ]; then
        [ -d "${TREE}" ] || fatal "content tree ${TREE} does not exist"
        [ -d "${TREE}/blobs" ] || fatal "${TREE} is not a content tree (it has no blobs/)"
        TREE=$(cd -P -- "${TREE}" && pwd -P)
        verify_media_outside_tree
    else
        [ -f "${BUNDLE}" ] || fatal "bundle ${BUNDLE} does not exist"
        case "${BUNDLE}" in
            *.tar.gz | *.tgz) ARCHIVE=registry.tar.gz ;;
            *.tar.zst) ARCHIVE=registry.tar.zst ;;
            *) fatal "bundle ${BUNDLE} is neither .tar.gz nor .tar.zst" ;;
        esac
    fi
    if [ -z "${REGISTRIES_YAML}" ]; then
        local beside
        beside=$(dirname -- "${TREE:-${BUNDLE}}")/registries.yaml
        if [ -f "${beside}" ]; then
            REGISTRIES_YAML=${beside}
        else
            REGISTRIES_YAML=${ROOT_DIR}/packaging/registries.yaml
        fi
    fi
    if [ "${IMAGES_ONLY}" = true ]; then
        info "images-only media for ${ARCHES[*]}: minimal-registry $(printf '%s ' "${REGISTRY_BINS[@]}")"
        return
    fi
    [ -f "${REGISTRIES_YAML}" ] || fatal "registries.yaml ${REGISTRIES_YAML} does not exist"
    grep -q '^mirrors:' "${REGISTRIES_YAML}" || fatal "${REGISTRIES_YAML} has no mirrors: section"
    grep -q 'bootstrap-registry\.airgap' "${REGISTRIES_YAML}" \
        || warn "${REGISTRIES_YAML} has no bootstrap-registry.airgap mirror, which install-node.sh's K3s server uses"
    local arch
    for arch in "${ARCHES[@]}"; do
        info "using for ${arch}: k3s ${K3S_BINS[${arch}]}, minimal-registry ${REGISTRY_BINS[${arch}]}"
    done
    info "using install.sh ${INSTALL_SH}, registries.yaml ${REGISTRIES_YAML}"
}

# A minimal-registry that runs here, to verify the tree.
find_registry_tool() {
    if [ -n "${MINIMAL_REGISTRY_BIN:-}" ]; then
        REGISTRY_TOOL=("${MINIMAL_REGISTRY_BIN}")
    elif [ -n "${MINIMAL_REGISTRY_CMD:-}" ]; then
        read -r -a REGISTRY_TOOL <<<"${MINIMAL_REGISTRY_CMD}"
    elif [ -x "${REGISTRY_BINS[${ARCH}]}" ] && "${REGISTRY_BINS[${ARCH}]}" --version >/dev/null 2>&1; then
        REGISTRY_TOOL=("${REGISTRY_BINS[${ARCH}]}")
    elif command -v minimal-registry >/dev/null 2>&1; then
        REGISTRY_TOOL=(minimal-registry)
    elif [ -d "${ROOT_DIR}/minimal_registry" ]; then
        REGISTRY_TOOL=(env "PYTHONPATH=${ROOT_DIR}${PYTHONPATH:+:${PYTHONPATH}}" "${PYTHON:-python3}" -m minimal_registry)
    else
        fatal "no minimal-registry runs on this host to verify the tree: set MINIMAL_REGISTRY_BIN"
    fi
}

verify_content() {
    if [ -n "${TREE}" ]; then
        find_registry_tool
        info "checking the content tree ${TREE} (minimal-registry verify --fast)"
        "${REGISTRY_TOOL[@]}" verify --fast -q -d "${TREE}" \
            || fatal "the content tree ${TREE} fails minimal-registry verify --fast (see above); fix or re-download it"
        return
    fi
    info "checking the bundle ${BUNDLE}"
    local listing=${TMP_DIR}/listing
    case "${ARCHIVE}" in
        registry.tar.gz) gzip -dc -- "${BUNDLE}" ;;
        registry.tar.zst)
            command -v zstd >/dev/null 2>&1 || fatal "checking ${BUNDLE} needs zstd"
            zstd -dcq -- "${BUNDLE}"
            ;;
    esac | tar -t -P -f - >"${listing}" || fatal "${BUNDLE} is not a complete archive"
    grep -q '^registry/blobs/' "${listing}" || fatal "${BUNDLE} holds no registry/blobs/: not a content bundle"
    # -P lists names as stored: an absolute name or a `..` would land outside registry/.
    if grep -v -q -E '^registry(/|$)' "${listing}" || grep -q -E '(^|/)\.\.(/|$)' "${listing}"; then
        fatal "${BUNDLE} holds files outside registry/"
    fi
}

# --- step: the media ---
# Bytes the archive of the tree needs at most: 512-byte headers, padded data, long names.
archive_estimate() {
    find "${TREE}" -printf '%s\n' | awk '{ total += 1536 + int(($1 + 511) / 512) * 512 } END { printf "%d", total + 20480 }'
}

# The archive's size at most: the tree's estimate, or the bundle's size.
archive_size_bound() {
    if [ -n "${TREE}" ]; then
        archive_estimate
    else
        stat -L -c '%s' -- "${BUNDLE}"
    fi
}

verify_space() {
    local need=0 file available
    for file in ${INSTALL_SH:+"${INSTALL_SH}"} "${K3S_BINS[@]}" "${REGISTRY_BINS[@]}"; do
        need=$((need + $(stat -L -c '%s' -- "${file}")))
    done
    need=$((need + $(archive_size_bound)))
    # FAT32 holds no file of 4 GiB or more.
    if [ "$(stat -f -c '%T' -- "${OUT}")" = msdos ] && [ "$(archive_size_bound)" -ge 4294967296 ]; then
        fatal "the content archive may reach 4 GiB, more than a FAT32 file can hold: format ${OUT} as exFAT or ext4"
    fi
    need=$((need + 1048576))
    available=$(df -P -k -- "${OUT}" | awk 'NR == 2 { print $4 }')
    available=$((available * 1024))
    if [ "${available}" -lt "${need}" ]; then
        fatal "not enough space on ${OUT}: $((need / 1048576)) MiB needed, $((available / 1048576)) MiB free"
    fi
}

prepare_media() {
    mkdir -p -- "${OUT}"
    OUT=$(cd "${OUT}" && pwd)
    verify_space
    STAGE=$(mktemp -d "${OUT}/.make-airgap-media.XXXXXX")
}

write_archive() {
    if [ -n "${BUNDLE}" ]; then
        cp -- "${BUNDLE}" "${STAGE}/${ARCHIVE}"
        return
    fi
    local compress=(gzip -n -c)
    ARCHIVE=registry.tar.gz
    if [ "${ZSTD}" = true ]; then
        compress=(zstd -q -c -T0 -9)
        ARCHIVE=registry.tar.zst
    fi
    info "packing ${TREE} into ${ARCHIVE}"
    # Deterministic: sorted names, fixed owner, mode bits and mtime, no host metadata;
    # the tree's own directory name becomes registry/. Not packed: what an interrupted
    # import leaves (.import-* staging directories, .tmp-* temporary names).
    LC_ALL=C tar -c -f - -C "${TREE}" \
        --format=gnu --sort=name --numeric-owner --owner=0 --group=0 \
        --mtime="@${SOURCE_DATE_EPOCH:-0}" --mode='u+rwX,go+rX,go-w' \
        --no-acls --no-selinux --no-xattrs \
        --exclude='.import-*' --exclude='.tmp-*' \
        --transform='s,^\.,registry,S' . \
        | "${compress[@]}" >"${STAGE}/${ARCHIVE}"
}

render_readme() {
    local version=${VERSION:-"(version not recorded: give -v)"} template=README.txt platforms
    [ "${IMAGES_ONLY}" = false ] || template=README-images-only.txt
    platforms=$(printf 'linux/%s, ' "${ARCHES[@]}")
    sed -e "s|@K3S_VERSION@|${version}|g" -e "s|@ARCH@|${platforms%, }|g" \
        -e "s|@ARCHIVE@|$(printf '%-24s' "${ARCHIVE}")|g" \
        "${ROOT_DIR}/packaging/${template}" >"${STAGE}/README.txt"
}

# The media's files: NAME<TAB>SOURCE. Generated ones are made in the staging directory.
media_files() {
    local arch
    printf '%s\t%s\n' \
        "${ARCHIVE}" "${STAGE}/${ARCHIVE}" \
        install-node.sh "${ROOT_DIR}/scripts/install-node.sh" \
        README.txt "${STAGE}/README.txt"
    if multi_arch; then
        for arch in "${ARCHES[@]}"; do
            printf 'minimal-registry-linux-%s\t%s\n' "${arch}" "${REGISTRY_BINS[${arch}]}"
            [ "${IMAGES_ONLY}" = true ] || printf '%s\t%s\n' "$(k3s_release_name "${arch}")" "${K3S_BINS[${arch}]}"
        done
    else
        printf 'minimal-registry\t%s\n' "${REGISTRY_BINS[${ARCH}]}"
        [ "${IMAGES_ONLY}" = true ] || printf 'k3s\t%s\n' "${K3S_BINS[${ARCH}]}"
    fi
    [ "${IMAGES_ONLY}" = true ] || printf '%s\t%s\n' \
        install.sh "${INSTALL_SH}" \
        minimal-registry.service "${ROOT_DIR}/minimal-registry.service" \
        registries.yaml "${REGISTRIES_YAML}"
}

# Files of ours a previous media in OUT may hold and this one does not: removed, so the
# media holds only what SHA256SUMS lists.
STALE_CANDIDATES="registry.tar.gz registry.tar.zst install.sh k3s k3s-arm64 minimal-registry
minimal-registry-linux-amd64 minimal-registry-linux-arm64 minimal-registry.service registries.yaml"

stage_files() {
    write_archive
    render_readme
    local name source sum
    while IFS=$'\t' read -r name source; do
        sum=$(sha256_of "${source}")
        printf '%s  %s\n' "${sum}" "${name}"
    done < <(media_files) | LC_ALL=C sort -k 2 >"${STAGE}/SHA256SUMS"
}

# Put SOURCE on the media as NAME unless the media's copy has the same bytes: through the
# staging directory and a rename, so a file on the media is always whole.
publish_file() {
    local name=$1 source=$2
    if [ -f "${OUT}/${name}" ] && cmp -s -- "${source}" "${OUT}/${name}"; then
        return 0
    fi
    if [ "${source}" != "${STAGE}/${name}" ]; then
        cp -- "${source}" "${STAGE}/${name}"
    fi
    # Executable where the file system keeps modes. FAT keeps none and may refuse chmod,
    # which is harmless: the node runs these through bash and sh.
    local mode=0644
    case "${name}" in
        k3s | k3s-* | minimal-registry | minimal-registry-linux-* | install.sh | install-node.sh) mode=0755 ;;
    esac
    chmod "${mode}" -- "${STAGE}/${name}" 2>/dev/null || true
    mv -f -- "${STAGE}/${name}" "${OUT}/${name}"
    WRITTEN+=("${name}")
}

# SHA256SUMS last, so a media whose writing was cut short fails install-node.sh's check.
# The other archive format goes if the media had it.
publish() {
    local name source
    while IFS=$'\t' read -r name source; do
        publish_file "${name}" "${source}"
    done < <(media_files)
    local keep
    keep=" $(media_files | cut -f 1 | tr '\n' ' ')"
    for name in ${STALE_CANDIDATES}; do
        case "${keep}" in *" ${name} "*) continue ;; esac
        if [ -e "${OUT}/${name}" ]; then
            rm -f -- "${OUT}/${name}"
            info "removed ${name}: this media does not hold it"
            WRITTEN+=("-${name}")
        fi
    done
    publish_file SHA256SUMS "${STAGE}/SHA256SUMS"
    sync -f -- "${OUT}/SHA256SUMS" 2>/dev/null || sync
}

summary() {
    if [ "${#WRITTEN[@]}" -eq 0 ]; then
        info "nothing to do: ${OUT} already holds this media"
    else
        info "wrote ${WRITTEN[*]} to ${OUT}"
    fi
    local what="media ready for ${ARCHES[*]}${VERSION:+ (K3s ${VERSION})}"
    [ "${IMAGES_ONLY}" = false ] || what="images-only media ready for ${ARCHES[*]}"
    info "${what}: on the node run  bash install-node.sh  from it"
}

# --- main ---
main() {
    trap cleanup EXIT
    parse_args "$@"
    verify_tools
    TMP_DIR=$(mktemp -d)
    prepare_binaries
    verify_inputs
    verify_content
    prepare_media
    stage_files
    publish
    summary
}

main "$@"
