"""The MLflow model of a run, as "models from code": MLflow copies this file into the logged
model and runs it on loading (nothing is pickled). The work is her2exp/evaluation/served.py's."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class PatchModel(mlflow.pyfunc.PythonModel):
    """RGB patches (base64 PNG/JPEG or uint8 lists) in; prob_her2_pos, called_her2_pos at the
    run's frozen tile-level operating point, threshold and operating_point out."""

    def load_context(self, context: Any) -> None:
        from her2exp.evaluation.served import ServedRun

        self.served = ServedRun(context.artifacts["checkpoint"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from her2exp.evaluation.served import RequestError

        try:
            return self.served.predict(model_input, params)
        except RequestError as exc:  # the client's mistake: HTTP 400 with the reason
            raise MlflowException(f"her2exp: {exc}", error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(PatchModel())
