"""The registered student as MLflow loads and serves it: a pyfunc "model from code", no pickle.

`defs/registry.py` logs this very file as the model's code (`mlflow.pyfunc.log_model(python_model=
<this file>)`) with plain artifacts: `student.json` (timm name, input size, normalisation, class
list), the weights as safetensors and, for an embedding student (`student.head: embedding`), its
classifier as data, `head.safetensors` (the teacher's text embeddings of the classes and its logit
scale): a version made by `dfkd add-classes` differs from its base in student.json and the head
only. Loading rebuilds the network from those files (core/student.py) after checking each against
the sha256 recorded when it was logged, so nothing in the model directory is ever unpickled;
`mlflow models serve` answers with it, and dfkd's own loader (defs/registry.py) reads the same
files without running this copy of the code.

The int8 variant (`<name>-onnx-int8`, asset champion_int8) is this same code model with the int8
ONNX graph (`onnx`) and student.json as its artifacts: ONNX Runtime answers behind the same input
contract, preprocessing (resize to the student's side; the graph normalises) and output frame.

Input contract (issue 37), checked before anything that grows with the input is allocated:
float images [N, 3, H, W] (or one [3, H, W]) with 1 <= N <= max_batch, min_side <= H, W <= max_side,
every value finite and in [0, 1] (the model resizes and normalises). The limits are the model's
own: `max_batch`, `min_side`, `max_side` in MLmodel's model_config, written when the version was
logged (defs/registry.py), DEFAULT_CONTRACT where a model_config lacks them; so `mlflow models serve`
enforces them without the project's settings. A request outside the contract is refused with an
InputContractError, an MlflowException with error_code INVALID_PARAMETER_VALUE: MLflow's scoring
server answers it with HTTP 400 and the message, which names the limit.
Output: one row per image, `label` (the most probable class), `score` (its probability) and one
probability column per class, in the class order of student.json.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

# artifact names in the model (files keep their own names); `head`: embedding students only; `onnx`: the
# int8 variant (`<name>-onnx-int8`), whose network is an ONNX graph run by ONNX Runtime instead of weights
WEIGHTS, SPEC, HEAD, ONNX = "weights", "spec", "head", "onnx"
SHA256 = {WEIGHTS: "weights_sha256", SPEC: "spec_sha256", HEAD: "head_sha256", ONNX: "onnx_sha256"}  # keys of the model_config in MLmodel
LABEL, SCORE = "label", "score"


# the input contract's limits (model_config keys) and their defaults: 32 images of at most 1024 x 1024
# (32 x 3 x 1024^2 float32 = 384 MiB of input at most; every image is resized to the student's input size)
DEFAULT_CONTRACT = {"max_batch": 32, "min_side": 8, "max_side": 1024}


class IntegrityError(RuntimeError):
    """A model file differs from the sha256 recorded when the model was logged."""


class InputContractError(MlflowException, ValueError):
    """Input outside the model's contract: MLflow's scoring server answers it with HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def input_contract(model_config: dict | None) -> dict[str, int]:
    """The limits of a model: its model_config's, DEFAULT_CONTRACT for any it lacks (a model logged before them)."""
    config = model_config or {}
    limits = {k: int(config.get(k, v)) for k, v in DEFAULT_CONTRACT.items()}
    if not (limits["max_batch"] >= 1 and 1 <= limits["min_side"] <= limits["max_side"]):
        raise ValueError(f"the model's input contract is inconsistent: {limits}")
    return limits


def describe_contract(limits: dict[str, int]) -> str:
    """The contract in words (model card, MLmodel metadata, docs)."""
    return (f"float32 images [N, 3, H, W] (or one [3, H, W]) with 1 <= N <= {limits['max_batch']} and "
            f"{limits['min_side']} <= H, W <= {limits['max_side']}, every value finite and in [0, 1]; "
            "anything else is refused with HTTP 400 (MLflow INVALID_PARAMETER_VALUE) naming the limit")


def check_input(images, limits: dict[str, int]) -> np.ndarray:
    """`images` as a float32 [N, 3, H, W] array once it meets the contract; InputContractError otherwise.

    Shape and dtype are read first, from the array as it arrived (nothing is copied or converted
    before they pass), then values: finite and in [0, 1] (0..255 pixels are refused, not guessed)."""
    if isinstance(images, dict) and len(images) == 1:
        images = next(iter(images.values()))
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        try:
            images = np.asarray(images)  # a nested list (a direct call): already in memory in a larger form
        except ValueError as e:  # ragged lists
            raise InputContractError(f"input contract: expected float images [N, 3, H, W] in [0, 1], got ragged data ({e})") from None
    shape = images.shape
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputContractError(f"input contract: expected float images [N, 3, H, W] in [0, 1], got an array of shape {tuple(shape)}")
    n, _, h, w = images.shape
    if not 1 <= n <= limits["max_batch"]:
        raise InputContractError(f"input contract: a batch of {n} images; this model takes 1 to {limits['max_batch']} per request "
                                 "(max_batch in its MLmodel model_config): send fewer at a time")
    for name, side in (("height", h), ("width", w)):
        if not limits["min_side"] <= side <= limits["max_side"]:
            raise InputContractError(f"input contract: image {name} {side} px; this model takes sides of {limits['min_side']} to "
                                     f"{limits['max_side']} px (min_side/max_side in its MLmodel model_config): resize the images")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputContractError(f"input contract: images must be floats in [0, 1], got dtype {images.dtype} "
                                 "(8-bit pixels: divide by 255)")
    if not np.isfinite(images).all():
        raise InputContractError("input contract: the images hold NaN or infinite values; every value must be finite and in [0, 1]")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise InputContractError(f"input contract: values must be in [0, 1], got {lo:g} to {hi:g}"
                                 + (" (0..255 pixels: divide by 255)" if hi > 1 and hi <= 255 and lo >= 0 else ""))
    return np.ascontiguousarray(images, dtype=np.float32)


def output_columns(classes: list[str]) -> list[str]:
    """`label`, `score`, then one column per class; a class named like a fixed column is refused."""
    clash = {LABEL, SCORE} & set(classes)
    if clash:
        raise ValueError(f"classes {sorted(clash)} collide with the model's output columns {LABEL!r}/{SCORE!r}: rename them in `classes`")
    return [LABEL, SCORE, *classes]


def verify_sha256(files: dict[str, Path], expected: dict[str, str], recorded_in: str) -> None:
    """Refuses to go on when a file's sha256 differs from the one in `expected` (or none is recorded)."""
    from dfkd_assets.core.io import sha256_file

    for name, path in files.items():
        want = expected.get(SHA256[name])
        if not want:
            raise IntegrityError(f"{recorded_in} records no {SHA256[name]} for {Path(path).name}: the model cannot be verified, not loaded")
        got = sha256_file(Path(path))
        if got != want:
            raise IntegrityError(f"{Path(path).name} ({path}) does not match the sha256 recorded in {recorded_in} "
                                 f"({got[:12]}... != {want[:12]}...): it was changed after logging; refusing to load it")


def build_student(files: dict[str, Path]):
    """The student network (core/student.StudentClassifier, eval mode, CPU) from its files; for the
    int8 variant (an `onnx` file beside the spec), the graph behind ONNX Runtime with the same
    interface and preprocessing (core/export.OnnxStudent)."""
    from dfkd_assets.core.student import load_student_files

    if ONNX in files:
        from dfkd_assets.core.export import OnnxStudent

        return OnnxStudent(Path(files[ONNX]), Path(files[SPEC]))
    return load_student_files(Path(files[SPEC]), Path(files[WEIGHTS]), Path(files[HEAD]) if HEAD in files else None)


def as_batch(images, limits: dict[str, int] | None = None):
    """float32 [N,3,H,W] in [0,1] as a torch tensor, checked against the input contract `limits`
    (DEFAULT_CONTRACT when None); a dict holding one array, as tensor inputs may arrive, is unwrapped."""
    import torch

    return torch.from_numpy(check_input(images, limits or DEFAULT_CONTRACT))


def probabilities_frame(student, images, limits: dict[str, int] | None = None):
    """The model's answer for `images`: a DataFrame of label, score and per-class probabilities."""
    import pandas as pd
    import torch

    x = as_batch(images, limits)  # the contract first: nothing below runs for input outside it
    with torch.no_grad():
        probs = student(x).softmax(-1).double().numpy()
    frame = pd.DataFrame(probs, columns=list(student.classes))
    frame.insert(0, SCORE, probs.max(1))
    frame.insert(0, LABEL, [student.classes[i] for i in probs.argmax(1)])
    return frame[output_columns(student.classes)]


class StudentModel(PythonModel):
    """What `mlflow.pyfunc.load_model` and `mlflow models serve` build from the model directory."""

    def load_context(self, context) -> None:
        files = {name: Path(context.artifacts[name]) for name in (WEIGHTS, SPEC, HEAD, ONNX) if name in context.artifacts}
        verify_sha256(files, context.model_config or {}, "the model's MLmodel (model_config)")
        self.limits = input_contract(context.model_config)
        self.student = build_student(files)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # the hint: MLflow validates against the signature
        return probabilities_frame(self.student, model_input, self.limits)


mlflow.models.set_model(StudentModel())
