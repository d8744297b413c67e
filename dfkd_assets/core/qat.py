"""Quantization-aware fine-tuning (QAT) of the student before post-training int8 quantization
(issue 38's second option): a copy of the fp32 student is distilled a few more epochs from the
teacher's soft labels on the synthetic images while its forward simulates what ONNX Runtime's static
QDQ int8 model (core/quantize.py) will compute, so the weights settle where int8 rounding costs
least. The result is an fp32 student again (the simulation removed), which the unchanged PTQ path
exports, calibrates and quantizes: the deployed artefact and its format are those of PTQ.

What is simulated, read off the QDQ graph `quantize_int8` writes for a timm ResNet (ONNX Runtime
1.32: Conv/Gemm get QDQ inputs and per-channel weights, Relu is removed into its producer's output
range, Add and ReduceMean are not quantized, MaxPool and Reshape keep their input's scale):

- BatchNorm folded into the convolutions first (`fold_batchnorm`): the fp32 export and ORT's
  pre-processing fold them, so the int8 weights are those of the folded convolutions;
- weights: per output channel, symmetric int8 in [-127, 127] (ORT's symmetric int8 range), scale
  max|w| / 127, recomputed from the current weights at every forward;
- activations: one scale per tensor, asymmetric uint8 (or int8, `activations`), range [min(0, lo),
  max(0, hi)] of the values the tensor took on the calibration images (MinMax), on every tensor ORT
  quantizes: the input of every convolution and linear layer, and the output of each that is not
  read by a ReLU (the ReLU's output is then the quantized tensor: the next layer's input). A fake-
  quantized tensor replaces the original for all its readers, as a DequantizeLinear output does.

Activation ranges are observed the way ORT calibrates them: the fp32 network (fake quantization
off) on the calibration images, before fine-tuning and again after every epoch, so they follow the
weights. Gradients pass through the rounding (straight-through estimator; values clipped by the
range get none), as in PyTorch's own QAT.

The training is core/distill's: `kd_forward` (augmentation, teacher targets, KD terms) run by
`run_epochs` with `sgd_cosine`; only the settings differ (`qat_distill_settings`).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.optimization import fuse
from torch.nn.utils import parametrize

from dfkd_assets.core.distill import DistillSettings, epoch_batches, kd_forward, run_epochs, sgd_cosine

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # ORT's symmetric int8 weight range (quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE)
ACTIVATION_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}
QAT_SEED_OFFSET = 2_000_000  # QAT epochs draw from their own seeds, apart from distillation's and the view pool's
LAYERS = (torch.nn.Conv2d, torch.nn.Linear)


class WeightFakeQuant(torch.nn.Module):
    """Parametrization of a conv/linear weight: per-output-channel symmetric int8 fake quantization
    (off while `observing`: ORT calibrates the fp32 graph)."""

    def __init__(self):
        super().__init__()
        self.observing = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return w
        absmax = w.detach().abs().flatten(1).amax(1)
        scale = torch.where(absmax > 0, absmax / WEIGHT_QMAX, torch.ones_like(absmax)).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, WEIGHT_QMIN, WEIGHT_QMAX)


class ActivationFakeQuant(torch.nn.Module):
    """One quantized tensor: records its min/max while `observing`, else fake-quantizes with the
    scale and zero point ORT's MinMax calibration gives that range (quant_utils.compute_scale_zp)."""

    def __init__(self, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax, self.observing = qmin, qmax, True
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def reset(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)
        scale = (hi - lo) / (self.qmax - self.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.reshape(1), torch.round(self.qmin - lo / scale).clamp(self.qmin, self.qmax).to(torch.int32).reshape(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.lo.copy_(torch.minimum(self.lo, x.detach().min()))
            self.hi.copy_(torch.maximum(self.hi, x.detach().max()))
            return x
        scale, zero = self.scale_zero()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, self.qmin, self.qmax)


def fold_batchnorm(module: torch.nn.Module) -> fx.GraphModule:
    """`module` (left untouched) traced (torch.fx) with every BatchNorm folded into the convolution
    before it, as the exported graph has them; in-place ops made out-of-place, so fake-quantized
    tensors are never written over. Refuses a network fx cannot trace or a BatchNorm it cannot fold."""
    try:
        folded = fuse(copy.deepcopy(module).eval(), inplace=True)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing here
        raise ValueError(f"quantization-aware fine-tuning traces the student's backbone with torch.fx, which failed for "
                         f"{type(module).__name__} ({type(e).__name__}: {e})") from None
    modules = dict(folded.named_modules())
    for node in list(folded.graph.nodes):  # timm's placeholders (drop_block, aa): no node in the exported graph either
        if node.op == "call_module" and isinstance(modules[node.target], torch.nn.Identity):
            node.replace_all_uses_with(node.args[0])
            folded.graph.erase_node(node)
    left = [name for name, m in folded.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f"quantization-aware fine-tuning folds every BatchNorm into its convolution; these follow no convolution: {left[:5]}")
    for m in folded.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for node in folded.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
    folded.recompile()
    return folded


def _is_relu(node: fx.Node, modules: dict) -> bool:
    return ((node.op == "call_module" and isinstance(modules[node.target], torch.nn.ReLU))
            or (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (node.op == "call_method" and node.target == "relu"))


SAME_SCALE_MODULES = (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.Flatten)
SAME_SCALE_FUNCTIONS = (torch.flatten, F.max_pool2d, F.avg_pool2d)
SAME_SCALE_METHODS = ("flatten", "view", "reshape")


def _is_layer(node: fx.Node, modules: dict) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], LAYERS)


def _same_scale_as_input(node: fx.Node, modules: dict) -> bool:
    """A pooling or reshaping node: ORT quantizes its output with its input's scale and zero point
    (QDQDirect8BitOp, QDQMaxPool) when that input is quantized."""
    return ((node.op == "call_module" and isinstance(modules[node.target], SAME_SCALE_MODULES))
            or (node.op == "call_function" and node.target in SAME_SCALE_FUNCTIONS)
            or (node.op == "call_method" and node.target in SAME_SCALE_METHODS))


def add_fake_quant(gm: fx.GraphModule, activations: str) -> int:
    """In place: fake quantization of every tensor ORT's QDQ quantizes, in graph order: the input of
    every conv/linear, its output unless only ReLUs read it, every ReLU's output, and the output of a
    pooling or reshape of a quantized tensor (with that tensor's quantizer). A fake-quantizing node is
    inserted after the tensor and all its readers read it. Every conv/linear weight gets its weight
    fake quantization. The activation ranges are empty (`observe_ranges` fills them); returns how
    many activation quantizers there are."""
    qmin, qmax = ACTIVATION_RANGE[activations]
    modules = dict(gm.named_modules())
    quantizer_of: dict[fx.Node, str] = {}  # a quantized tensor (and its fake-quantized node) -> its quantizer

    def quantize(node: fx.Node, name: str | None = None) -> None:
        if node in quantizer_of:
            return
        if name is None:
            name = f"qat_act_{len(set(quantizer_of.values()))}"
            gm.add_module(name, ActivationFakeQuant(qmin, qmax))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        quantizer_of[node] = quantizer_of[q] = name

    for node in list(gm.graph.nodes):
        if _is_layer(node, modules):
            quantize(node.args[0])
            if not node.users or not all(_is_relu(u, modules) for u in node.users):
                quantize(node)
        elif _is_relu(node, modules):
            quantize(node)
        elif _same_scale_as_input(node, modules) and node.args[0] in quantizer_of:
            quantize(node, quantizer_of[node.args[0]])
    gm.recompile()
    for m in list(gm.modules()):
        if isinstance(m, LAYERS):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
    return len(set(quantizer_of.values()))


def remove_fake_quant(gm: fx.GraphModule) -> fx.GraphModule:
    """In place: the fake-quantizing nodes taken out and the weight parametrizations removed, keeping
    the trained fp32 weights: the plain folded network again."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActivationFakeQuant):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name, _ in [(n, m) for n, m in gm.named_children() if isinstance(m, ActivationFakeQuant)]:
        gm.delete_submodule(name)
    gm.recompile()
    for m in gm.modules():
        if isinstance(m, LAYERS) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return gm


def set_observing(model: torch.nn.Module, observing: bool) -> None:
    """Fake quantization off (`observing`: activation ranges recorded, fp32 weights) or on."""
    for m in model.modules():
        if isinstance(m, (ActivationFakeQuant, WeightFakeQuant)):
            m.observing = observing


@torch.no_grad()
def observe_ranges(model: torch.nn.Module, calibration: Iterable[np.ndarray]) -> None:
    """Every activation range re-observed on the calibration batches (float [B,3,S,S] in [0, 1]) with
    fake quantization off, as ORT's MinMax calibration runs the fp32 graph; then fake quantization on."""
    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, ActivationFakeQuant):
            m.reset()
    set_observing(model, True)
    device = next(model.parameters()).device
    for batch in calibration:
        model(torch.as_tensor(batch).to(device))
    set_observing(model, False)
    model.train(was_training)


def qat_distill_settings(distill: DistillSettings, epochs: int, lr: float) -> DistillSettings:
    """Distillation's settings for the fine-tune: `epochs` at `lr` (cosine to 0), KD to the teacher's
    soft labels only (no cross-entropy to the prompt class, no feature term: a logit student's
    embedding head is not in the exported graph), no PGD and no view pool; augmentation, temperature,
    batch size, momentum, weight decay and seed as distillation's."""
    return dataclasses.replace(distill, epochs=epochs, lr=lr, ce_weight=0.0, feature_weight=0.0, adversarial_eps=0.0, teacher_views=0)


def simulated_int8(student: torch.nn.Module, activations: str, calibration: list[np.ndarray], device=None) -> torch.nn.Module:
    """A copy of `student` whose backbone is folded and fake-quantized, ranges observed on
    `calibration`: what the int8 model computes, in PyTorch (the fine-tune's model, and a test's)."""
    if getattr(student, "embed", None) is not None and getattr(student, "text_embeddings", None) is not None:
        raise ValueError("quantization-aware fine-tuning simulates a logit student (student.head: logits); an embedding student's "
                         "projection and text head lie outside its backbone")
    sim = copy.deepcopy(student).eval()
    sim.backbone = fold_batchnorm(student.backbone)
    add_fake_quant(sim.backbone, activations)
    sim.to(device or torch.device("cpu"))
    observe_ranges(sim, calibration)
    return sim


def qat_finetune(
    student: torch.nn.Module,
    teacher,
    head: torch.Tensor,
    images: torch.Tensor,
    distill: DistillSettings,
    activations: str,
    calibration: list[np.ndarray],
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """(fine-tuned fp32 copy of `student` with BatchNorm folded, per-epoch history): `distill` (see
    `qat_distill_settings`) epochs of KD on the uint8 images [N,H,W,3] (the synthetic set) under int8
    simulation, activation ranges re-observed on `calibration` after each epoch, on the device of
    `head` (the teacher's). `student` is not changed; the copy is returned on the CPU."""
    device = head.device
    sim = simulated_int8(student, activations, calibration, device)
    data = images.to(device).permute(0, 3, 1, 2).contiguous()
    n = data.shape[0]
    steps = distill.epochs * max(1, (n + distill.batch_size - 1) // distill.batch_size)
    opt, sched = sgd_cosine(sim.parameters(), distill.lr, distill.momentum, distill.weight_decay, steps)
    forward = kd_forward(sim, teacher, head, data, torch.full((n,), -1, dtype=torch.long, device=device), distill)

    def after_epoch(record: dict) -> None:
        observe_ranges(sim, calibration)
        if on_epoch is not None:
            on_epoch(record)

    history = run_epochs(sim, opt, sched, forward, epoch_batches(n, distill.batch_size, device), distill.epochs,
                         lambda epoch: distill.seed * 100_003 + QAT_SEED_OFFSET + epoch, on_epoch=after_epoch)
    remove_fake_quant(sim.backbone)
    return sim.cpu().eval(), history
