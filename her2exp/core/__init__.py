"""The ground floor: what every package needs and that needs nothing of her2exp.

Owns `errors` (`ConfigError`, `UserError`: a mistake reported as one line), `fileio` (atomic
writes, safe names, staged folders), `checkpoint` (crash-safe, weights-only checkpoints with
their sha256 sidecars, RNG state), `seed` and `progress` (every progress bar: rank 0, stderr,
one switch; here so that every floor can draw one). Imports no other her2exp package, only the
standard library, numpy, torch and tqdm (tqdm in `progress` alone).
"""
