"""MLflow pyfunc flavour of a DELG model, logged as "models from code": nothing is pickled.

Input: a DataFrame with a column `image` holding encoded image bytes. Output: one row per image with the
L2-normalised global descriptor. ilr's own services load the weights directly (models.artifacts.load,
weights_only); this flavour is for MLflow tooling and registry signatures.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class DelgModel(PythonModel):
    def load_context(self, context):
        from models import artifacts
        from models.extract import Extractor

        self.extractor = Extractor(artifacts.load(context.artifacts["delg"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from data.images import decode

        images = [np.asarray(decode(bytes(b), f"row {i}")) for i, b in enumerate(model_input["image"])]
        return np.stack([f.global_desc for f in self.extractor.extract(images)]).astype(np.float32)


mlflow.models.set_model(DelgModel())
