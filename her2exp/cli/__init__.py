"""The console scripts, one module per command; `common.hydra_command` is their convention.

Each module parses (Hydra over a schema of schemas.py), calls the library and prints; the work
itself lives in the library modules (evaluation, predict, compare, prepare, server, tracking,
data.sources). docs/architecture.md, "Commands", describes the convention.
"""
