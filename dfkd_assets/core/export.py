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


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session of `path` (`threads`: intra-op threads; None = ONNX Runtime's choice)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_predictor(path: Path, threads: int | None = None):
    """images float [B,3,S,S] in [0,1] (a torch tensor, S = the graph's input side) -> logits tensor:
    an exported model as a core/evaluation.Predictor."""
    sess = onnx_session(path, threads)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(["logits"], {"images": np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)})[0])

    return predict


class OnnxStudent:
    """An exported student (fp32 or int8 ONNX) behind ONNX Runtime with the student's interface:
    `classes`, `input_size`, and a call on float images [B,3,H,W] in [0,1] of any size -> logits
    [B,K] (a tensor), resized first as the student's own forward resizes them
    (core/student.resize_input; the graph holds the normalisation). What the registry's int8
    variant serves (registry_model.py) and `dfkd predict` runs."""

    def __init__(self, onnx_file: Path, spec_file: Path, threads: int | None = None):
        import json

        spec = json.loads(Path(spec_file).read_text())
        self.classes, self.input_size = list(spec["classes"]), int(spec["input_size"])
        self.session = onnx_session(onnx_file, threads)
        shape = self.session.get_inputs()[0].shape
        if shape[-2:] != [self.input_size, self.input_size]:
            raise ValueError(f"{Path(onnx_file).name} takes images of {shape[-2:]}, {Path(spec_file).name} says input_size {self.input_size}")

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        from dfkd_assets.core.student import resize_input

        x = resize_input(torch.as_tensor(x01, dtype=torch.float32).cpu(), self.input_size)
        return torch.from_numpy(self.session.run(["logits"], {"images": np.ascontiguousarray(x.numpy())})[0])

    def to(self, device) -> "OnnxStudent":
        if torch.device(device).type != "cpu":
            raise ValueError("an ONNX student runs on the CPU (ONNX Runtime's CPU execution provider)")
        return self

    def eval(self) -> "OnnxStudent":
        return self
