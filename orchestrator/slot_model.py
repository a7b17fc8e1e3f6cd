"""The MLflow model of a promoted checkpoint, logged as *code* (MLflow's models from code):
MLflow copies this file into the model and runs it when the model is loaded, so loading
unpickles nothing (a pickled ``PythonModel`` would run whatever the pickle holds; MLflow warns
about that on every log). It imports ``core`` only, which the model carries (``code_paths``).

Input: a clip (B, T, 3, H, W) float32, normalised like training. Output: ``slots``
(B, T, K, D), ``masks`` (B, T, K, h, w) (decoder alpha masks) and ``attn_masks`` (slot
attention), as numpy arrays."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch


class SlotModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from core.config import load_config
        from core.models.build import build_model

        # the architecture only: every weight, the backbone's too, comes from the state dict
        cfg = load_config(context.artifacts["config"], ["model.encoder.backbone.weights=random"])
        self.model = build_model(cfg).eval()
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)

    # model_input: np.ndarray is the hint MLflow infers no schema from (the logged signature
    # checks the input): no validation by hints, and no "add type hints" warning at import.
    def predict(self, context, model_input: np.ndarray, params=None):
        video = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
        with torch.no_grad():
            out = self.model({"video": video})
        h, w = self.model.grid_size
        return {
            "slots": out["slots"].numpy(),
            "masks": out["decoder_masks"].unflatten(-1, (h, w)).numpy(),
            "attn_masks": out["attn_masks"].unflatten(-1, (h, w)).numpy(),
        }


mlflow.models.set_model(SlotModel())
