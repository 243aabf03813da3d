"""Load generators and probe clients of the corpus, one per protocol: each runs as a process
of its own (``python3 load/NAME.py ...``, printing one JSON line) and is imported by its
program's module for one-shot requests. They import nothing of the corpus package."""
