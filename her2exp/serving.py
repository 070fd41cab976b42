"""The module path that MLflow models logged before the layered package import
(`from her2exp.serving import ServedRun, RequestError` in their copy of serving_model.py).
A thin alias of :mod:`her2exp.evaluation.served`, exempt from the layer contract: a registered
model must keep loading."""

from her2exp.evaluation.served import *  # noqa: F403
from her2exp.evaluation.served import RequestError, ServedRun

__all__ = ["RequestError", "ServedRun"]
