"""minimal-registry: a tiny read-only OCI registry that serves a directory of images to K3s."""

__version__ = "0.1.0"
