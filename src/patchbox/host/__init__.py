"""Every process of the host: find the agents (`ps`), talk to thousands at once, apply or
remove a patch everywhere (`apply --all`, `remove --all`)."""
