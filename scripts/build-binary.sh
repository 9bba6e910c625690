#!/usr/bin/env bash
# Build minimal-registry as ONE self-contained executable that runs on any Linux of its
# architecture (no Python, no shared library needed on the node).
#
# Usage:
#   scripts/build-binary.sh [amd64|arm64]     (default: this machine's architecture)
#
# Output:
#   dist/minimal-registry-linux-<arch>          the executable
#   dist/minimal-registry-linux-<arch>.sha256   its checksum (`cd dist && sha256sum -c ...`)
#
# How:
#   1. a venv of the distribution's Python (Debian's python3.11; not a pyenv build, whose
#      RUNPATH breaks step 3) with the exact versions of build/constraints.txt;
#   2. PyInstaller, build/pyinstaller.spec: a one-file executable, still linked to this
#      machine's glibc;
#   3. `staticx --no-compress`: bundles that glibc and the loader, so nothing is left to link
#      at start ("not a dynamic executable"). No compression: it would double start-up.
#      staticx is built from its pinned sdist with build/staticx-noexec.patch: its bootloader
#      then refuses a noexec TMPDIR in one line that names the fix, instead of a bare EACCES.
#   For the other architecture (arm64 on an amd64 machine, or the reverse), the same script
#   runs steps 1-3 natively inside a Debian root of that architecture, made once with
#   `debootstrap --arch` and kept in the cache, through qemu-user-static and binfmt_misc.
#
# Needs: Debian 12 (or a derivative), root (apt-get, debootstrap, chroot, mount), and access
# to a Debian mirror and to PyPI (or the index pip is configured for). It installs the
# Debian packages it needs when they are missing. A second run reuses the venv, pip's cache
# and the foreign root: only PyInstaller and staticx run again.
#
# Environment variables (all optional):
#   BUILD_PYTHON         Python used for the native build venv (default: /usr/bin/python3.11).
#   BUILD_CACHE_DIR      Kept between builds: venvs, pip's and PyInstaller's caches, the
#                        staticx sdist, foreign Debian roots (default: build/cache, ignored
#                        by git). Remove it for a cold build.
#   BUILD_WORK_DIR       PyInstaller's log (default: build/work, ignored by git).
#   BUILD_DIST_DIR       Where the executable and its .sha256 go (default: dist).
#   BUILD_DEBIAN_MIRROR  Mirror for debootstrap and the foreign root's apt
#                        (default: http://deb.debian.org/debian).
#   BUILD_SUITE          Debian release of the foreign root (default: bookworm, whose
#                        python3.11 matches the native build's).
#   BUILD_NO_APT         1: never run apt-get; fail naming the missing packages instead.
#   PIP_CERT, SSL_CERT_FILE
#                        CA bundle for pip's TLS when the network uses a private CA; the
#                        bundle is copied into the foreign root and used there too.
#   PIP_INDEX_URL        A PyPI mirror; passed into the foreign root as well.
#   SOURCE_DATE_EPOCH    Timestamp recorded in the build (default: the last commit's time).

set -o errexit -o nounset -o pipefail

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
NAME="minimal-registry"
CONSTRAINTS="${ROOT_DIR}/build/constraints.txt"
SPEC="${ROOT_DIR}/build/pyinstaller.spec"

BUILD_PYTHON="${BUILD_PYTHON:-/usr/bin/python3.11}"
BUILD_CACHE_DIR="${BUILD_CACHE_DIR:-${ROOT_DIR}/build/cache}"
BUILD_WORK_DIR="${BUILD_WORK_DIR:-${ROOT_DIR}/build/work}"
BUILD_DIST_DIR="${BUILD_DIST_DIR:-${ROOT_DIR}/dist}"
BUILD_DEBIAN_MIRROR="${BUILD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUILD_SUITE="${BUILD_SUITE:-bookworm}"
BUILD_NO_APT="${BUILD_NO_APT:-}"

STATICX_PATCH="${ROOT_DIR}/build/staticx-noexec.patch"
# The sdist of the staticx pinned in build/constraints.txt, as PyPI publishes it.
STATICX_SDIST_SHA256="bf7d5d35d5777a72b2d4c408eb25f9c61049b28b94a388a012122dba00fffa93"

# Debian packages for a native build (staticx's bootloader builds with scons and musl-gcc).
NATIVE_PACKAGES=(python3.11 python3.11-venv libpython3.11 binutils patchelf ca-certificates
    scons gcc libc6-dev musl-tools patch)
# Debian packages on this machine for a foreign build.
FOREIGN_HOST_PACKAGES=(debootstrap qemu-user-static binfmt-support)

info() {
    echo "[build-binary] $*" >&2
}

fatal() {
    echo "[build-binary] ERROR: $*" >&2
    exit 1
}

# shellcheck disable=SC2317  # run by `trap cleanup EXIT`
cleanup() {
    local code=$?
    if [ -n "${TMP_DIR:-}" ] && [ -d "${TMP_DIR}" ]; then
        rm -rf -- "${TMP_DIR}"
    fi
    exit "${code}"
}

# --- arguments and architectures ---------------------------------------------------------

# Debian's architecture name -> the kernel's (uname -m).
machine_of() {
    case "$1" in
        amd64) echo x86_64 ;;
        arm64) echo aarch64 ;;
        *) fatal "unsupported architecture '$1' (use amd64 or arm64)" ;;
    esac
}

host_arch() {
    case "$(uname -m)" in
        x86_64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) fatal "unsupported machine $(uname -m): build on amd64 or arm64" ;;
    esac
}

parse_args() {
    case "${1:-}" in
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
    esac
    [ "$#" -le 1 ] || fatal "usage: $0 [amd64|arm64]"
    HOST_ARCH="$(host_arch)"
    ARCH="${1:-${HOST_ARCH}}"
    MACHINE="$(machine_of "${ARCH}")"
    OUTPUT="${BUILD_DIST_DIR}/${NAME}-linux-${ARCH}"
}

# --- Debian packages ---------------------------------------------------------------------

missing_packages() {
    local package
    for package in "$@"; do
        if ! dpkg-query --show --showformat='${db:Status-Status}' "${package}" 2>/dev/null |
            grep -qx installed; then
            echo "${package}"
        fi
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "${BUILD_NO_APT}" = 1 ]; then
        fatal "missing Debian packages: ${missing[*]} (apt-get install them, or unset BUILD_NO_APT)"
    fi
    [ "$(id -u)" -eq 0 ] || fatal "missing Debian packages: ${missing[*]} (run as root, or install them)"
    info "Installing Debian packages: ${missing[*]}"
    # Wait for another apt run to finish rather than fail on its lock.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends "${missing[@]}"
}

# --- native build ------------------------------------------------------------------------

setup_pip_env() {
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    export PIP_CACHE_DIR="${BUILD_CACHE_DIR}/pip"
    export PYINSTALLER_CONFIG_DIR="${BUILD_CACHE_DIR}/pyinstaller"
    if [ -z "${PIP_CERT:-}" ] && [ -n "${SSL_CERT_FILE:-}" ]; then
        export PIP_CERT="${SSL_CERT_FILE}"
    fi
}

# The venv is rebuilt when the pins or the Python change: its stamp records both.
ensure_venv() {
    local stamp
    VENV="${BUILD_CACHE_DIR}/venv-linux-${ARCH}"
    [ -x "${BUILD_PYTHON}" ] || fatal "${BUILD_PYTHON} not found (apt-get install python3.11-venv, or set BUILD_PYTHON)"
    case "$(readlink -f "${BUILD_PYTHON}")" in
        */.pyenv/*) fatal "${BUILD_PYTHON} is a pyenv build; use the distribution's /usr/bin/python3.11" ;;
    esac
    stamp="$("${BUILD_PYTHON}" -c 'import sys; print(sys.version)' | tr -d '\n'
        sha256sum "${CONSTRAINTS}" "${STATICX_PATCH}" | cut -d' ' -f1 | tr '\n' ' ')"
    if [ -f "${VENV}/.stamp" ] && [ "$(cat "${VENV}/.stamp")" = "${stamp}" ]; then
        info "Reusing the build venv ${VENV}"
        return 0
    fi
    info "Creating the build venv ${VENV} with ${BUILD_PYTHON}"
    rm -rf -- "${VENV}"
    mkdir -p "${BUILD_CACHE_DIR}"
    "${BUILD_PYTHON}" -m venv "${VENV}"
    # Wheels only: nothing but staticx compiles, so the pins alone decide what is bundled.
    "${VENV}/bin/pip" install -q --only-binary=:all: -c "${CONSTRAINTS}" \
        gevent greenlet zope.event zope.interface docopt-ng httptools zstandard \
        pyinstaller pyinstaller-hooks-contrib altgraph packaging pyelftools setuptools wheel
    install_staticx
    echo "${stamp}" >"${VENV}/.stamp"
}

# staticx from its pinned sdist (checked against its published sha256), patched, built here:
# its setup.py compiles the bootloader with scons and musl-gcc.
install_staticx() {
    local version sdist source
    version="$(sed -n 's/^staticx==//p' "${CONSTRAINTS}")"
    [ -n "${version}" ] || fatal "no staticx==VERSION line in ${CONSTRAINTS}"
    sdist="${BUILD_CACHE_DIR}/sources/staticx-${version}.tar.gz"
    if [ ! -f "${sdist}" ]; then
        "${VENV}/bin/pip" download -q --no-deps --no-binary=:all: \
            -d "${BUILD_CACHE_DIR}/sources" "staticx==${version}"
    fi
    echo "${STATICX_SDIST_SHA256}  ${sdist}" | sha256sum -c --quiet - ||
        fatal "${sdist} does not match STATICX_SDIST_SHA256 (a new pin needs its hash and a patch check)"
    tar -xzf "${sdist}" -C "${TMP_DIR}"
    source="${TMP_DIR}/staticx-${version}"
    patch --quiet --forward -p1 -d "${source}" <"${STATICX_PATCH}" ||
        fatal "${STATICX_PATCH} does not apply to staticx ${version}"
    info "Building staticx ${version} (patched bootloader)"
    # musl, as in staticx's own wheels: a bootloader on static glibc can crash in NSS.
    BOOTLOADER_CC=musl-gcc "${VENV}/bin/pip" install -q --no-deps --no-build-isolation \
        -c "${CONSTRAINTS}" "${source}"
}

source_date_epoch() {
    if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
        SOURCE_DATE_EPOCH="$(git -C "${ROOT_DIR}" log -1 --format=%ct 2>/dev/null || date +%s)"
    fi
    export SOURCE_DATE_EPOCH
}

run_pyinstaller() {
    local log="${BUILD_WORK_DIR}/pyinstaller-${ARCH}.log"
    info "PyInstaller: one-file build (${MACHINE}); log in ${log}"
    mkdir -p "${BUILD_WORK_DIR}"
    # The project's own directory first, so the bundled package is this checkout. A fresh work
    # tree each time: PyInstaller's reuse of an old one trusts mtimes, and a file changed
    # during a build was once left out of the next. Its bincache (stripped libraries) stays.
    if ! (cd "${ROOT_DIR}" && PYTHONHASHSEED=0 PYTHONPATH="${ROOT_DIR}" "${VENV}/bin/pyinstaller" \
        --noconfirm --log-level WARN \
        --workpath "${TMP_DIR}/pyinstaller-work" \
        --distpath "${TMP_DIR}/pyinstaller" \
        "${SPEC}") >"${log}" 2>&1; then
        tail -n 40 "${log}" >&2
        fatal "PyInstaller failed (whole log: ${log})"
    fi
    # gevent's hook names its tests and libuv backend, which the spec excludes on purpose.
    grep -v 'Hidden import "gevent\.\(test\|libuv\)' "${log}" >&2 || true
}

run_staticx() {
    info "staticx: bundling the C library and loader"
    # staticx runs ldd, objcopy, strip and patchelf: the system's, never a venv's or pyenv's.
    PATH="${VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin" "${VENV}/bin/staticx" --no-compress \
        "${TMP_DIR}/pyinstaller/${NAME}" "${TMP_DIR}/${NAME}"
}

check_output() {
    local binary="$1" ldd_says version
    ldd_says="$(ldd "${binary}" 2>&1 || true)"
    case "${ldd_says}" in
        *"not a dynamic executable"* | *"statically linked"*) ;;
        *) fatal "${binary} is still dynamic: ${ldd_says}" ;;
    esac
    version="$(env -i "${binary}" --version)" || fatal "${binary} --version failed"
    case "${version}" in
        *"${MACHINE}"*) info "Built: ${version}" ;;
        *) fatal "${binary} --version does not name ${MACHINE}: ${version}" ;;
    esac
}

publish() {
    local part="${OUTPUT}.part"
    mkdir -p "${BUILD_DIST_DIR}"
    install -m 0755 "${TMP_DIR}/${NAME}" "${part}"
    mv -f -- "${part}" "${OUTPUT}"
    (cd "${BUILD_DIST_DIR}" && sha256sum "$(basename "${OUTPUT}")" >"$(basename "${OUTPUT}").sha256")
    info "Wrote ${OUTPUT} ($(du -h "${OUTPUT}" | cut -f1)) and its .sha256"
}

build_native() {
    install_packages "${NATIVE_PACKAGES[@]}"
    setup_pip_env
    ensure_venv
    source_date_epoch
    run_pyinstaller
    run_staticx
    check_output "${TMP_DIR}/${NAME}"
    publish
}

# --- foreign build: a Debian root of the target architecture, through qemu ---------------

# binfmt_misc lets the kernel hand the root's foreign executables to qemu; the F flag (set
# by Debian's qemu-user-static) keeps the interpreter open, so it works inside chroot.
ensure_binfmt() {
    local entry="/proc/sys/fs/binfmt_misc/qemu-${MACHINE}"
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        info "Mounting binfmt_misc"
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            fatal "cannot mount binfmt_misc (a container without the privilege?): run on a VM or host, or build on a ${ARCH} machine"
    fi
    if [ ! -e "${entry}" ]; then
        update-binfmts --enable "qemu-${MACHINE}" || fatal "cannot register qemu-${MACHINE} with binfmt_misc"
    fi
    grep -qx enabled "${entry}" || fatal "${entry} is disabled (update-binfmts --enable qemu-${MACHINE})"
    grep -q '^flags:.*F' "${entry}" || fatal "${entry} lacks the F flag: executables inside a chroot cannot find qemu"
}

# A minimal Debian root, made once and kept in the cache. The build packages are not
# debootstrap's --include (its resolver is too simple for python3.11-venv): this script
# apt-gets them when it runs inside.
ensure_root() {
    FOREIGN_ROOT="${BUILD_CACHE_DIR}/rootfs-${BUILD_SUITE}-${ARCH}"
    if [ -f "${FOREIGN_ROOT}/.complete" ]; then
        info "Reusing the ${ARCH} root ${FOREIGN_ROOT}"
        return 0
    fi
    info "Making the ${BUILD_SUITE} ${ARCH} root ${FOREIGN_ROOT} (debootstrap; some minutes)"
    rm -rf --one-file-system -- "${FOREIGN_ROOT}"
    mkdir -p "${BUILD_CACHE_DIR}"
    debootstrap --arch="${ARCH}" --variant=minbase --include=ca-certificates \
        "${BUILD_SUITE}" "${FOREIGN_ROOT}" "${BUILD_DEBIAN_MIRROR}"
    touch "${FOREIGN_ROOT}/.complete"
}

# Run this script inside the root, in a private mount namespace: the bind mounts vanish with
# it, whatever way it ends.
build_foreign() {
    local ca_env=() pass_env=()
    [ "$(id -u)" -eq 0 ] || fatal "a ${ARCH} build on ${HOST_ARCH} needs root (debootstrap, chroot, mount)"
    install_packages "${FOREIGN_HOST_PACKAGES[@]}"
    ensure_binfmt
    ensure_root
    source_date_epoch

    cp -L /etc/resolv.conf "${FOREIGN_ROOT}/etc/resolv.conf" 2>/dev/null || true
    local ca_file="${PIP_CERT:-${SSL_CERT_FILE:-}}"
    if [ -n "${ca_file}" ] && [ -f "${ca_file}" ]; then
        cp -L "${ca_file}" "${FOREIGN_ROOT}/etc/ssl/certs/build-ca-bundle.crt"
        ca_env=(PIP_CERT=/etc/ssl/certs/build-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/certs/build-ca-bundle.crt)
    fi
    if [ -n "${PIP_INDEX_URL:-}" ]; then
        pass_env+=("PIP_INDEX_URL=${PIP_INDEX_URL}")
    fi
    mkdir -p "${BUILD_DIST_DIR}" "${BUILD_WORK_DIR}" "${FOREIGN_ROOT}/src" "${FOREIGN_ROOT}/dist" \
        "${FOREIGN_ROOT}/build-work"

    info "Building inside the ${ARCH} root (through qemu-${MACHINE})"
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    unshare --mount --propagation private -- /bin/bash -c '
        set -o errexit -o nounset
        root="$1" src="$2" dist="$3" work="$4"
        shift 4
        mount --bind "${src}" "${root}/src"
        mount -o remount,bind,ro "${root}/src"
        mount --bind "${dist}" "${root}/dist"
        mount --bind "${work}" "${root}/build-work"
        mount -t proc proc "${root}/proc"
        mount --rbind /dev "${root}/dev"
        exec chroot "${root}" "$@"
    ' build-in-root "${FOREIGN_ROOT}" "${ROOT_DIR}" "${BUILD_DIST_DIR}" "${BUILD_WORK_DIR}" \
        /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        BUILD_CACHE_DIR=/var/cache/minimal-registry-build \
        BUILD_WORK_DIR=/build-work \
        BUILD_DIST_DIR=/dist \
        BUILD_DEBIAN_MIRROR="${BUILD_DEBIAN_MIRROR}" \
        BUILD_NO_APT="${BUILD_NO_APT}" \
        SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH}" \
        "${ca_env[@]}" "${pass_env[@]}" \
        /bin/bash /src/scripts/build-binary.sh "${ARCH}"
    [ -x "${OUTPUT}" ] || fatal "the build inside the root wrote no ${OUTPUT}"
    info "Wrote ${OUTPUT} ($(du -h "${OUTPUT}" | cut -f1)) and its .sha256"
}

# --- main --------------------------------------------------------------------------------

main() {
    parse_args "$@"
    TMP_DIR="$(mktemp -d)"
    trap cleanup EXIT
    if [ "${ARCH}" = "${HOST_ARCH}" ]; then
        build_native
    else
        build_foreign
    fi
}

# One line, read whole before it runs: editing this file during a build cannot derail it.
main "$@"; exit
