"""The forms of a registered model's URI and of an alias, checked before any store is read.

`her2exp-predict model_uri=...` and `her2exp-promote alias=...` refuse a malformed value in one
line at the command line's check; her2exp.tracking.registry resolves a parsed URI against the
store (mlflow) and re-exports these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from her2exp.core.errors import ConfigError

MODEL_URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
#: An alias MLflow accepts: letters, digits, _ and -.
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model URI: a registered model's alias or version, or a training run."""

    kind: str  # alias | version | run
    name: str  # the registered model's name, or the run id (kind run)
    ref: str = ""  # the alias or the version number


def parse_model_uri(model_uri: str) -> ModelRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID[/model]`; anything else is
    one line naming what is allowed."""
    uri = str(model_uri).strip()
    bad = ConfigError(f"model_uri={model_uri!r} is not allowed ({MODEL_URI_FORMS})")
    if uri.startswith("runs:/"):
        parts = uri[len("runs:/") :].strip("/").split("/")
        if not parts[0] or len(parts) > 2 or (len(parts) == 2 and parts[1] != "model"):
            raise bad
        return ModelRef("run", parts[0])
    if not uri.startswith("models:/"):
        raise bad
    body = uri[len("models:/") :]
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return ModelRef("alias", name, alias)
        raise bad
    name, _, version = body.rpartition("/")
    if name and version.isdigit() and int(version) > 0:
        return ModelRef("version", name, version)
    raise bad
