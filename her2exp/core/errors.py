"""The two kinds of mistake a command reports as one `her2exp: ...` line and exit 2.

Low in the floors so that every package can raise them without importing the command line.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


class UserError(ConfigError):
    """A mistake of the user's outside the configuration values (a flag, a missing file)."""
