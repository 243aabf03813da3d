"""The corpus of real security fixes (docs/corpus.md), run as ``python -m corpus`` with
``scripts/`` on the path (``scripts/corpus/run.sh`` installs what it needs, then does so).

Modules, lowest first; each imports only modules above it (tests/test_layering.py):

- ``fixes``: the corpus, one entry per fix (data);
- ``load``: the load generators and the probes' clients, one module per protocol, run as
  processes of their own (by path) or imported for one request; nothing of the package;
- ``harness``: commands, daemons, load, ``patchbox build`` of one fix, the apply / probe /
  remove sequence;
- ``report``: one verdict per fix, the summary, the table of docs/corpus.md;
- ``levels``: Debian source packages, the tree at the level before each fix built by a
  program's recipe, and the loop running each fix against its level;
- ``qemu_scsi``, ``qemu_virtio``, ``qemu_pci``: QEMU's device probes, each driving its
  device through qtest (``load/qtest_client.py``) on a machine of its own;
- ``dnsmasq``, ``memcached``, ``openssh``, ``qemu``: one module per program (its recipe,
  daemon, load and probes);
- ``__main__``: the command line.
"""
