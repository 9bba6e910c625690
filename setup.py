from setuptools import find_packages, setup

from minimal_registry import __version__

setup(
    name="minimal-registry",
    version=__version__,
    description="A tiny read-only container registry that serves a directory of images to K3s in an air gap",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["minimal_registry", "minimal_registry.*"]),
    install_requires=[
        # The server is pywsgi's WSGIServer with our own handler class and StreamServer's
        # accept hooks overridden (do_read, full, wrap_socket_and_handle), which a new major
        # release may change.
        "gevent>=24.2,<27",
        # llhttp, Node's HTTP parser, parses every request (connection.py); 0.9 is the release
        # whose strictness the tests check (its llhttp refuses what RFC 9112 says to refuse).
        "httptools>=0.9,<1",
        # docopt-ng is the maintained docopt (same `import docopt`).
        "docopt-ng>=0.9,<1",
    ],
    extras_require={
        # Reading `.tar.zst` archives (K3s airgap tarballs) when importing content.
        "zstd": ["zstandard>=0.22,<1"],
        "test": ["pytest>=7,<10", "hypothesis>=6,<7"],
    },
    entry_points={"console_scripts": ["minimal-registry=minimal_registry.cli:main"]},
)
