"""Numerics of DFKD-VLFM in plain PyTorch: no Dagster, MLflow or DVC imports here (tested)."""
