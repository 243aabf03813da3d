"""Compare objects: an original and a patched build of the same tree, function by function,
deciding what is in a patch, what is out, and what is refused (``patchbox build``)."""
