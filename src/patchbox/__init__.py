"""patchbox: live patching for running Linux processes."""

__version__ = "0.1.0"
__all__ = ["__version__"]
