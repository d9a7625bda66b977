"""pyproxy: a userspace kube-proxy replacement (see README.md)."""

__version__ = "0.1.0"
