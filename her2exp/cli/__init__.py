"""The console entry points: parse (Hydra, `key=value`), call the library, print, and turn a
user's mistake into one `her2exp: ...` line with exit code 2 (docs/architecture.md, "Commands")."""
