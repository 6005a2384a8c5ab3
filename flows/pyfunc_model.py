"""The registered model as MLflow "models from code": `mlflow.pyfunc.load_model("models:/NAME@champion")` returns
this class over the logged artifacts (our native model directory, and the circuit-tracer export beside it).

`predict(raw MLP inputs [N, L, d])` returns the reconstructed raw MLP outputs `[N, L, d]`; with
`params={"output": "features"}` it returns the feature activations `[N, L, F]` instead.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class CLTPyfunc(PythonModel):
    # Untyped on purpose: MLflow reads type hints as a schema of lists of instances; the signature is logged instead.
    def load_context(self, context):
        from clt_core.model.directory import load

        self.model, self.normalizer, _, _ = load(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if self.normalizer is not None:
            x = self.normalizer.inputs(x)
        with torch.no_grad():
            out = self.model(x)
        if (params or {}).get("output") == "features":
            return out.activations.numpy()
        y = out.reconstruction
        return (y if self.normalizer is None else self.normalizer.raw_targets(y)).numpy()


mlflow.models.set_model(CLTPyfunc())
