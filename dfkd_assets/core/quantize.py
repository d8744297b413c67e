"""Post-training static int8 quantization of the exported student, calibrated on synthetic images only.

Why ONNX Runtime's quantizer (`onnxruntime.quantization.quantize_static`) and not PyTorch's PT2E
(`torch.ao`) flow: it quantizes the exact artefact `champion_onnx` already exported, checked
against PyTorch and registered as `<name>-onnx`, and that ONNX Runtime serves. PT2E would be a
second export path (prepare, calibrate, convert, export again) whose graph could drift from the
fp32 one; here the int8 model is the fp32 ONNX graph with QuantizeLinear/DequantizeLinear pairs
added (QDQ format), so fp32 and int8 differ by quantization and nothing else.

Choices: QDQ format (QuantizeLinear/DequantizeLinear around each quantized operator, which ONNX
Runtime fuses into integer kernels), int8 weights with per-channel scales (`per_channel`), 8-bit
activations, unsigned by default (`activations: uint8`, U8S8): the x86 integer dot product
(AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`) multiplies unsigned by signed bytes, so ONNX Runtime
runs U8S8 natively and S8S8 through a slower path (ResNet-18 at 224 px, batch 1, one thread on this
AVX-512 VNNI EPYC: 11.5 ms U8S8, 26.5 ms S8S8, 35.3 ms fp32). Without VNNI, `vpmaddubsw` can
saturate with U8S8; the accuracy check would catch it, and `activations: int8` is the way out.
MinMax calibration by default (the range each activation reached on the calibration images).
`quant_pre_process` (shape inference and graph optimisation, which folds BatchNorm into the
convolutions where it can) runs first, as ONNX Runtime advises.

Calibration data: `SyntheticCalibration` reads only the synthetic shards it is given (tar files of
PNGs, core/io.read_shard, each image checked against its sha256) and resizes them to the model's
input side the way the student does (core/student.resize_input: bilinear with antialias), so no
real image is ever read. The images are taken round-robin over the shards (image 0 of every shard,
then image 1, ...), the first `calibration_images` of that order: the same set every time, every
class equally while the classes have images left.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from dfkd_assets.core.io import atomic_write_bytes, read_shard
from dfkd_assets.core.student import resize_input

CALIBRATION_BATCH = 32  # images per calibration batch (memory only: MinMax ranges do not depend on it)
INPUT_NAME = "images"  # the exported graph's input (core/export.py)


@dataclass(frozen=True)
class QuantizationSettings:
    calibration_images: int  # how many synthetic images calibrate the activation ranges
    per_channel: bool  # one weight scale per output channel (else one per tensor)
    calibration_method: Literal["minmax", "percentile", "entropy"]
    activations: Literal["uint8", "int8"]  # activation type (weights are always int8)
    max_top1_drop: float  # the most top-1 (fraction) int8 may lose against fp32 on any evaluation domain
    qat_epochs: int  # quantization-aware fine-tuning epochs before quantizing (core/qat.py); 0: post-training quantization only
    qat_lr: float  # its initial learning rate (cosine to 0)


def resize_like_student(images_uint8: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,size,size] in [0,1], resized as the student's own forward does
    (core/student.resize_input) when the side differs."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255
    return np.ascontiguousarray(resize_input(x, size).numpy(), dtype=np.float32)


def calibration_order(counts: list[int], n: int) -> list[tuple[int, int]]:
    """(shard, image) pairs, round-robin over the shards, the first `n` (or all there are)."""
    out, i = [], 0
    while len(out) < n and i < max(counts, default=0):
        out += [(s, i) for s, c in enumerate(counts) if i < c]
        i += 1
    return out[:n]


class SyntheticCalibration(CalibrationDataReader):
    """Calibration batches for `quantize_static` from synthetic shard folders (`shard_dirs`: each
    holds images.tar + manifest.json, core/io.write_shard) and nothing else. The shards are read on
    the first `get_next`; `count` is how many images in all (fewer if the shards hold fewer)."""

    def __init__(self, shard_dirs: list[Path], count: int, input_size: int, batch_size: int = CALIBRATION_BATCH):
        if not shard_dirs:
            raise ValueError("no synthetic shards to calibrate on")
        self.shard_dirs, self.count, self.input_size, self.batch_size = [Path(d) for d in shard_dirs], int(count), int(input_size), batch_size
        self._batches = None
        self.images_read = 0

    def _load(self) -> list[np.ndarray]:
        shards = [read_shard(d, verify=True)[0] for d in self.shard_dirs]
        picked = np.stack([shards[s][i] for s, i in calibration_order([len(x) for x in shards], self.count)])
        self.images_read = len(picked)
        return [resize_like_student(picked[i : i + self.batch_size], self.input_size) for i in range(0, len(picked), self.batch_size)]

    def batches(self) -> list[np.ndarray]:
        """Every calibration batch at once (float [B,3,S,S] in [0, 1]): what `get_next` hands ONNX Runtime,
        for the quantization-aware fine-tune's range observation (core/qat.observe_ranges)."""
        return self._load()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = iter(self._load())
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._batches = None


def synthetic_images(shard_dirs: list[Path]) -> np.ndarray:
    """uint8 [N,H,W,3]: every image of the synthetic shards `shard_dirs`, each checked against its sha256,
    in shard order: the quantization-aware fine-tune's training set (the same files calibration reads)."""
    if not shard_dirs:
        raise ValueError("no synthetic shards to fine-tune on")
    return np.concatenate([read_shard(Path(d), verify=True)[0] for d in shard_dirs])


def quantize_int8(fp32_onnx: Path, out: Path, calibration: CalibrationDataReader, settings: QuantizationSettings) -> None:
    """`fp32_onnx` quantized (QDQ, int8 weights, `settings.activations` activations) with activation ranges from `calibration`, written to `out` atomically."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(q), calibration, quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                        activation_type=QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=method[settings.calibration_method])
        atomic_write_bytes(Path(out), q.read_bytes())


def top1_drops(fp32: dict[str, float], int8: dict[str, float]) -> dict[str, float]:
    """fp32 top-1 minus int8 top-1 per domain (positive: int8 lost accuracy)."""
    return {d: fp32[d] - int8[d] for d in fp32}


def within_tolerance(drops: dict[str, float], max_drop: float) -> bool:
    """Every domain's drop at most `max_drop` (a tiny slack for float rounding of the fractions)."""
    return bool(drops) and all(v <= max_drop + 1e-9 for v in drops.values())
