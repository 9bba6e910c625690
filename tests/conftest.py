"""Shared fixtures: real content trees built by `imagetree`, and the registry serving them."""

import pytest

from imagetree import build_standard_tree
from serverproc import running_registry
from fixtures_clients import *  # noqa: F401,F403 - containerd, skopeo and certs.d fixtures


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """The standard tree without its 64 MiB blob: for in-process and header tests."""
    return build_standard_tree(tmp_path_factory.mktemp("small") / "registry", with_big=False)


@pytest.fixture(scope="session")
def full_tree(tmp_path_factory):
    """The standard tree with every shape, the >64 MiB blob included."""
    return build_standard_tree(tmp_path_factory.mktemp("full") / "registry", with_big=True)


@pytest.fixture(scope="session")
def registry(full_tree):
    """The registry process serving the full standard tree, shared by read-only tests."""
    with running_registry(full_tree.root) as running:
        yield running


def pytest_configure(config):
    # The route table sends methods wsgiref's validator has never heard of, on purpose.
    config.addinivalue_line("filterwarnings", "ignore::wsgiref.validate.WSGIWarning")
