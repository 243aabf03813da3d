"""patchbox: live patching for running Linux processes."""
