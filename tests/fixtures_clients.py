"""pytest fixtures for the real-client tests; conftest.py imports them (`from fixtures_clients import *`).

Session-scoped: the standard tree (built once, ~70 MiB with the big blob), the registry serving
it, one containerd daemon and the certs.d directories pointing containerd at the registry.
Function-scoped `containerd` empties the daemon before each test, so every pull starts from
nothing and really fetches from the registry.

A missing containerd, ctr or skopeo is an ERROR with the reason, never a skip: CI installs them.
"""

from pathlib import Path
from typing import Dict, Iterator

import pytest

import clients
from imagetree import StandardTree
from serverproc import RunningRegistry, running_registry

__all__ = ["standard_tree", "tree_registry", "containerd_daemon", "containerd", "certs_dirs",
           "skopeo_available", "tls_registry", "tls_certs_dirs"]


@pytest.fixture(scope="session")
def standard_tree(full_tree) -> StandardTree:
    """The suite's full standard tree (conftest.full_tree), under the name these tests use."""
    return full_tree


@pytest.fixture(scope="session")
def tree_registry(registry) -> RunningRegistry:
    """The suite's registry serving it (conftest.registry)."""
    return registry


@pytest.fixture(scope="session")
def containerd_daemon() -> Iterator[clients.Containerd]:
    reason = clients.containerd_missing()
    if reason:
        pytest.fail(f"cannot test with containerd: {reason}", pytrace=False)
    try:
        daemon = clients.start_containerd()
    except clients.ClientFailure as failure:
        pytest.fail(f"cannot start containerd: {failure}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def containerd(containerd_daemon: clients.Containerd) -> clients.Containerd:
    """The session's daemon, emptied: no image, no content, no snapshot."""
    containerd_daemon.remove_all_images()
    return containerd_daemon


@pytest.fixture(scope="session")
def certs_dirs(tree_registry: RunningRegistry, tmp_path_factory) -> Dict[str, Path]:
    """form -> a certs.d mirroring MIRRORED_HOST and docker.io to the registry, as K3s writes it.

    Also "no-default": the current form as K3s writes it with --disable-default-registry-endpoint
    (no `server` line). containerd 1.6 still falls back to the upstream after a miss.
    """
    dirs = {}
    for form in clients.HOSTS_TOML_FORMS:
        certs_d = tmp_path_factory.mktemp(f"certs.d-{form}")
        for host in (clients.MIRRORED_HOST, "docker.io"):
            clients.write_hosts_toml(certs_d, host, tree_registry.url, form=form)
        dirs[form] = certs_d
    certs_d = tmp_path_factory.mktemp("certs.d-no-default")
    for host in (clients.MIRRORED_HOST, "docker.io"):
        clients.write_hosts_toml(certs_d, host, tree_registry.url, default_endpoint=False)
    dirs["no-default"] = certs_d
    return dirs


@pytest.fixture(scope="session")
def skopeo_available() -> None:
    reason = clients.skopeo_missing()
    if reason:
        pytest.fail(f"cannot test with skopeo: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def tls_registry(standard_tree: StandardTree, tmp_path_factory) -> Iterator[RunningRegistry]:
    """The same tree over HTTPS, with a self-signed certificate for 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    certificate, key = clients.make_self_signed_certificate(directory)
    with running_registry(standard_tree.root, "--tls-cert", str(certificate), "--tls-key", str(key),
                          log_path=directory / "registry.log") as registry:
        registry.certificate = certificate
        yield registry


@pytest.fixture(scope="session")
def tls_certs_dirs(tls_registry: RunningRegistry, tmp_path_factory) -> Dict[str, Path]:
    """form -> certs.d for `configs: {127.0.0.1:PORT: {tls: {ca_file: ...}}}` in registries.yaml."""
    dirs = {}
    for form in clients.HOSTS_TOML_FORMS:
        certs_d = tmp_path_factory.mktemp(f"tls-certs.d-{form}")
        clients.write_hosts_toml(certs_d, clients.MIRRORED_HOST, tls_registry.url, form=form,
                                 ca_file=tls_registry.certificate)
        dirs[form] = certs_d
    return dirs
