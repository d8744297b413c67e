"""Using a registered student: load `models:/<name>@<alias>` from MLflow and classify files.

The registered model owns its preprocessing and class names (core/student.StudentClassifier),
so this is all a consumer needs: images in, class probabilities out. It is loaded through
defs/registry.load_student_model: safetensors + JSON checked against their registered sha256,
never unpickled; a version in the old pickle format is refused with how to re-register it.
"""

from __future__ import annotations

from pathlib import Path


def load_registered(tracking_uri: str, model_uri: str):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dfkd_assets.defs.registry import RegistryError, load_student_model
    from dfkd_assets.redaction import redact, tracking_credentials
    from dfkd_assets.registry_model import IntegrityError

    # a server's credentials go to MLflow's variables for the download only, never to a later server
    with tracking_credentials(tracking_uri) as bare_uri:
        mlflow.set_tracking_uri(bare_uri)
        mlflow.set_registry_uri(bare_uri)
        try:
            return load_student_model(MlflowClient(tracking_uri=bare_uri, registry_uri=bare_uri), model_uri)
        except (RegistryError, IntegrityError, MlflowException) as e:
            raise SystemExit(redact(f"error: cannot load {model_uri} from {bare_uri}: {getattr(e, 'message', e)}")) from None


def predict_files(model, files: list[Path], top_k: int = 3, batch_size: int = 32) -> list[dict]:
    import numpy as np
    import torch

    from dfkd_assets.core.evaluation import load_image

    rows = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        x = torch.from_numpy(np.stack([load_image(f, model.input_size) for f in chunk])).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            probs = model(x).softmax(-1)
        for f, p in zip(chunk, probs):
            top = p.topk(min(top_k, len(model.classes)))
            rows.append({"file": str(f), "top": [(model.classes[j], float(v)) for v, j in zip(top.values, top.indices)]})
    return rows
