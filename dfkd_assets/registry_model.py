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

Input: float32 images [N, 3, H, W] in [0, 1], any H and W (the model resizes and normalises).
Output: one row per image, `label` (the most probable class), `score` (its probability) and one
probability column per class, in the class order of student.json.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

WEIGHTS, SPEC, HEAD = "weights", "spec", "head"  # artifact names in the model (files keep their own names); `head`: embedding students only
SHA256 = {WEIGHTS: "weights_sha256", SPEC: "spec_sha256", HEAD: "head_sha256"}  # keys of the model_config in MLmodel
LABEL, SCORE = "label", "score"


class IntegrityError(RuntimeError):
    """A model file differs from the sha256 recorded when the model was logged."""


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
    """The student network (core/student.StudentClassifier, eval mode, CPU) from its files."""
    from dfkd_assets.core.student import load_student_files

    return load_student_files(Path(files[SPEC]), Path(files[WEIGHTS]), Path(files[HEAD]) if HEAD in files else None)


def as_batch(images):
    """float32 [N,3,H,W] in [0,1] as a torch tensor (a dict holding one array, as tensor inputs may arrive, is unwrapped)."""
    import torch

    if isinstance(images, dict) and len(images) == 1:
        images = next(iter(images.values()))
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected float images [N, 3, H, W] in [0, 1], got an array of shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def probabilities_frame(student, images):
    """The model's answer for `images`: a DataFrame of label, score and per-class probabilities."""
    import pandas as pd
    import torch

    with torch.no_grad():
        probs = student(as_batch(images)).softmax(-1).double().numpy()
    frame = pd.DataFrame(probs, columns=list(student.classes))
    frame.insert(0, SCORE, probs.max(1))
    frame.insert(0, LABEL, [student.classes[i] for i in probs.argmax(1)])
    return frame[output_columns(student.classes)]


class StudentModel(PythonModel):
    """What `mlflow.pyfunc.load_model` and `mlflow models serve` build from the model directory."""

    def load_context(self, context) -> None:
        files = {name: Path(context.artifacts[name]) for name in (WEIGHTS, SPEC, HEAD) if name in context.artifacts}
        verify_sha256(files, context.model_config or {}, "the model's MLmodel (model_config)")
        self.student = build_student(files)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # the hint: MLflow validates against the signature
        return probabilities_frame(self.student, model_input)


mlflow.models.set_model(StudentModel())
