"""Deployment export: the student as ONNX (any batch size, fixed input side), with a parity
check against PyTorch, so a consumer without PyTorch gets the same logits."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from dfkd_assets.core.io import atomic_write_bytes


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    """Input `images` float [B,3,S,S] in [0,1] (S = model.input_size), output `logits` [B,K]."""
    model = model.cpu().eval()
    s = model.input_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp:  # the exporter writes files; publish atomically
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.rand(2, 3, s, s),), str(out), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"x01": {0: batch}}, external_data=False, verbose=False)
        atomic_write_bytes(Path(path), out.read_bytes())


def onnx_parity(model: torch.nn.Module, path: Path, batch_sizes=(1, 7), seed: int = 0) -> float:
    """Max |ONNX Runtime - PyTorch| over random batches (several batch sizes: the batch axis is dynamic)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    model = model.cpu().eval()
    for b in batch_sizes:
        x = torch.rand(b, 3, model.input_size, model.input_size, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst
