"""`dfkd bench` / `python -m dfkd_assets.tools.bench`: where the time goes, measured side by side.

Sections (each prints a table and is written to the JSON as soon as it is done):
  synthesis  the reference loop (one image at a time, Python-loop cutouts, fp32, eager) against the
             engine (batched, vectorised cutouts, channels-last + bf16 on GPU, optionally compiled)
             on the same models, prompts, seeds, iterations and image count: images/s, the ratio,
             and the mean final text-image cosine of both (speed must not cost quality).
  flops      FLOPs of one synthesis step (torch.utils.flop_counter), achieved TFLOP/s and MFU.
  profile    torch.profiler over a few engine steps: the step's device time by kind of work (matmul,
             convolution, attention, resampling, normalisation, Inductor-fused kernels, copies, ...)
             and the top kernels; optionally a Chrome trace (--trace).
  distill    KD images/s, with the step split into augmentation / teacher / student, and with
             cached teacher logits (augmentation off).
  load       per-partition model loading (from weight files written here) against the partition's
             synthesis compute at the measured engine speed.
  latency    CPU inference latency of students against the teacher's image encoder, batch 1 and 32,
             eager PyTorch and ONNX Runtime.
  deploy     edge deployment (issue 38): at the settings' student shape and at the paper's (ResNet-18,
             224 px, against ViT-B-32; random weights), the teacher's image tower + zero-shot head,
             the student in fp32 (PyTorch, ONNX Runtime) and in int8 (ONNX Runtime, core/quantize.py):
             file size, parameters, MACs, batch-1 latency p50/p99 and batch-32 throughput at 1 and 2
             threads (--deploy-repeats; the int8 model calibrated on random images: timing only).
  quality    student accuracy against synthesis compute: each --schedule (settings overrides; the
             first is the baseline) distilled and evaluated at every --seeds through `dfkd compare`'s
             run (the product's stages), its synthesis FLOPs counted, and
             `compute_ratio_at_equal_accuracy`, its KD wall time and `kd_time_ratio_at_equal_accuracy`;
             a PNG curve beside the JSON. Not in the default
             sections: it trains a student per schedule and seed (minutes each at the demo budget).
Random weights cost the same as trained ones, so `--config configs/paper-smoke.yaml` measures the
paper's shapes (ViT-B-32, f16 VQGAN, 224 px) anywhere; `configs/ci.yaml` is the tiny CPU case.
Numbers, machine and command are recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
SECTIONS = ("synthesis", "flops", "profile", "distill", "load", "latency", "deploy", "quality")
DEFAULT_SECTIONS = SECTIONS[:-2]  # deploy and quality are asked for by name
# dense bf16 tensor-core peak by the vendor's datasheets, TFLOP/s (MFU denominator)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _targets(teacher, n: int):
    return teacher.encode_text([f"a photo of a thing number {i}" for i in range(n)])


def _engine_variants(base, device, compile_modes: list[str]) -> list[tuple[str, object]]:
    """The engine settings bench_synthesis times, named: fp32 always (the like-for-like comparison with
    the reference loop), then the defaults when they differ from fp32, native CPU bf16 where the CPU has
    it (a user's choice, not a default), and one compiled variant per requested mode."""
    from dfkd_assets.core.devices import cpu_has_native_bf16

    variants = [("engine fp32 (batched, vectorised)", dataclasses.replace(base, bf16=False, channels_last=False))]
    if base.bf16 or base.channels_last:
        variants.append((f"engine default ({'bf16' if base.bf16 else 'fp32'}{', channels-last' if base.channels_last else ''})", base))
    if device.type == "cpu" and not base.bf16 and cpu_has_native_bf16():  # precision: bf16, a CPU user's choice
        variants.append(("engine bf16 (native CPU bf16, precision: bf16)", dataclasses.replace(base, bf16=True)))
    for mode in compile_modes:
        variants.append((f"engine default + torch.compile ({mode})", dataclasses.replace(base, compile=True, compile_mode=mode)))
    return variants


def _add_rates(rows: list[dict], images: int, iters: int) -> None:
    """Derive each row's rates from its wall time, in place: images/s, seconds per step, images per hour
    at the paper's 400 steps, and the speed-up over the first row (the reference loop)."""
    for r in rows:
        r["images_per_s"] = images / r["seconds"]
        r["seconds_per_step"] = r["seconds"] / iters / (images / r["batch"])
        r["images_per_hour_at_400_steps"] = 3600 * images * iters / (400 * r["seconds"])
        r["speedup_vs_reference"] = rows[0]["seconds"] / r["seconds"]


def bench_synthesis(cfg, device, teacher, vqgan, images: int, batch: int, iters: int, compile_modes: list[str]) -> dict:
    """Reference loop vs engine variants on the same targets and seeds.

    Each compiled variant is timed after its warm-up (`warmup_seconds`: the first 2-step batch,
    compilation included, with the Inductor cache this process started with) and then compiled
    once more after `torch._dynamo.reset()` (`warm_cache_warmup_seconds`: the on-disk cache is now
    warm; what a later partition pays when TORCHINDUCTOR_CACHE_DIR is shared, a little optimistic,
    as a new process must also import and load what this one has in memory).
    """
    import numpy as np
    import torch

    from dfkd_assets.core.reference_synthesis import reference_synthesize
    from dfkd_assets.core.synthesis import synthesize_batch
    from dfkd_assets.loaders import synthesis_settings

    base = dataclasses.replace(synthesis_settings(cfg, device), iterations=iters, compile=False)
    targets, seeds = _targets(teacher, images), list(range(images))
    reference = dataclasses.replace(base, bf16=False, channels_last=False)

    def engine_run(s, gen, tea):
        return [synthesize_batch(gen, tea, targets[i : i + batch], seeds[i : i + batch], s) for i in range(0, images, batch)]

    def warm_up(s, models) -> float:
        t0 = time.perf_counter()
        synthesize_batch(*models, targets[:batch], seeds[:batch], dataclasses.replace(s, iterations=2))
        _sync(device)
        return time.perf_counter() - t0

    rows = []
    warm = dataclasses.replace(reference, iterations=1)
    reference_synthesize(vqgan, teacher, targets[:1], seeds[:1], warm)  # warm-up (allocator, kernels)
    ref, dt = _timed(lambda: reference_synthesize(vqgan, teacher, targets, seeds, reference), device)
    ref_cos = ref.cosines
    rows.append({"variant": "reference loop (batch 1, fp32, eager)", "batch": 1, "seconds": dt, "cosine": float(ref_cos.mean())})

    for name, s in _engine_variants(base, device, compile_modes):
        models = (vqgan, teacher)  # compiling wraps the step function, not the models: they are shared
        warm_s = warm_up(s, models)
        out, dt = _timed(lambda s=s, models=models: engine_run(s, *models), device)
        cos = np.concatenate([r.cosines for r in out])
        row = {"variant": name, "batch": batch, "seconds": dt, "warmup_seconds": warm_s, "cosine": float(cos.mean()),
               "max_cosine_diff_vs_reference": float(np.abs(cos - ref_cos).max())}
        if s.compile:
            torch._dynamo.reset()
            row["warm_cache_warmup_seconds"] = warm_up(s, models)
            torch._dynamo.reset()
        rows.append(row)
    _add_rates(rows, images, iters)
    spread = float(np.std(ref_cos) / np.sqrt(len(ref_cos)))
    return {"images": images, "iterations": iters, "cutn": base.cutn, "image_size": base.image_size,
            "reference_cosine_sem": spread, "rows": rows}


def count_step_flops(teacher, vqgan, batch: int, settings) -> tuple[float, dict[str, float]]:
    """FLOPs (matmul/conv/attention, forward + backward) of one optimisation step at `batch` images,
    in total and by top-level module (the image tower, the decoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dfkd_assets.core.augment import ImageRngs
    from dfkd_assets.core.synthesis import draw_step, init_latents, step_loss

    device = next(vqgan.parameters()).device
    rngs = ImageRngs(list(range(batch)), device)
    z = init_latents(vqgan, rngs, settings.image_size, settings.noise_start_fraction).requires_grad_(True)
    draws, targets = draw_step(rngs, settings, teacher.image_size, device), _targets(teacher, batch)
    with FlopCounterMode(display=False) as fc:
        step_loss(vqgan, teacher, z, draws, targets, settings).sum().backward()
    # top-level modules only: they add up to the total (nested names misattribute some backward work)
    by_module = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items() if k != "Global" and "." not in k}
    return float(fc.get_total_flops()), by_module


def bench_flops(synth: dict, teacher, vqgan, cfg, device, batch: int, peak_tflops: float | None) -> dict:
    from dfkd_assets.loaders import synthesis_settings

    flops, by_module = count_step_flops(teacher, vqgan, batch, synthesis_settings(cfg, device))
    rows = []
    for r in synth["rows"]:
        per_step = flops / batch * r["batch"]
        achieved = per_step / r["seconds_per_step"] / 1e12
        rows.append({"variant": r["variant"], "tflops_per_step": per_step / 1e12, "achieved_tflops": achieved,
                     "mfu": achieved / peak_tflops if peak_tflops else None})
    return {"flops_per_image_step": flops / batch, "flops_per_image_step_by_module": {k: v / batch for k, v in by_module.items()},
            "peak_bf16_tflops": peak_tflops, "rows": rows}


# kinds of device work, by kernel or operator name (first match wins); "other" is elementwise work
# and anything unlisted
_KINDS = (  # patterns match the lower-cased name
    ("matmul", r"^triton_tem_|^triton_mm"),  # Inductor's matmul/conv templates (max-autotune)
    ("inductor fused", r"^triton_|^cpp_fused|compiledfxgraph|compiledfunction|kernel_cpp"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn_mha"),
    ("convolution", r"conv|cudnn|implicit_gemm|implicit_convolve|winograd|dgrad|wgrad|fprop"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|\bmm\b|aten::mm|addmm|bmm|matmul|linear"),
    ("resampling", r"grid_sampler|roi_align|roialign|upsample|interpolate|nearest"),
    ("random numbers", r"randn|normal_|normal_kernel|aten::normal|philox|aten::rand\b|uniform"),
    ("normalisation", r"norm"),
    ("copy / memset / layout", r"copy|memcpy|memset|fill|aten::cat|contiguous|clone|nchw|nhwc|transpose"),
    ("optimizer", r"adam|foreach|lerp|addcdiv|addcmul"),
)


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator does, from its name (see `_KINDS`)."""
    low = name.lower()
    return next((kind for kind, pattern in _KINDS if re.search(pattern, low)), "other")


def bench_profile(cfg, device, teacher, vqgan, batch: int, steps: int, compile_mode: str | None, trace: Path | None) -> dict:
    """Where one engine step's time goes: `torch.profiler` over `steps` steps after a warm-up.

    On CUDA the device kernels are summed by kind (their self time: nothing is counted twice); on
    a CPU, the operators' self CPU time. Compiled steps show Inductor's fused kernels as such.
    """
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from dfkd_assets.core.synthesis import synthesize_batch
    from dfkd_assets.loaders import synthesis_settings

    s = synthesis_settings(cfg, device)
    s = dataclasses.replace(s, compile=compile_mode is not None, compile_mode=compile_mode or s.compile_mode)
    models = (vqgan, teacher)
    targets, seeds = _targets(teacher, batch), list(range(batch))
    synthesize_batch(*models, targets, seeds, dataclasses.replace(s, iterations=2))  # warm-up / compile
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    marks = []

    def on_step(step: int, _loss: float) -> None:  # step ends: the schedule records steps 2..steps+1 only
        _sync(device)
        marks.append(time.perf_counter())
        prof.step()

    # one unrecorded step first, and one after, so neither the start nor the final render is counted
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        synthesize_batch(*models, targets, seeds, dataclasses.replace(s, iterations=steps + 2), on_step=on_step)
    wall = marks[steps] - marks[0]
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    on_device = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if on_device and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e6  # seconds
        if t > 0:
            rows.append({"name": e.key, "kind": kind_of(e.key), "calls": e.count, "seconds": t})
    total = sum(r["seconds"] for r in rows) or float("nan")
    kinds: dict[str, float] = {}
    for r in rows:
        r["share"] = r["seconds"] / total
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["share"]
    rows.sort(key=lambda r: -r["seconds"])
    return {"batch": batch, "steps": steps, "compiled": s.compile, "compile_mode": s.compile_mode if s.compile else None,
            "timer": "device kernels, self time" if on_device else "CPU operators, self time",
            "wall_seconds_per_step": wall / steps, "profiled_seconds_per_step": total / steps,
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top": rows[:25],
            "trace": str(trace) if trace is not None else None}


class StageClock:
    """A `clock` for the distillation engine (core/distill.Clock): seconds per stage of a step,
    the device synchronised around each, so a stage's time is its own."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def bench_distill(cfg, device, teacher, n_images: int, epochs: int, image_size: int, batch_size: int | None) -> dict:
    """The product's distillation (core/distill.distill) on random images: steps/s and images/s with
    the per-step teacher (augmented inputs) and with the teacher's logits cached once (no
    augmentation), and the augmented step's time split into augment / teacher / student (forward,
    loss, backward) / update (optimiser and schedule), from a clock the engine calls around each."""
    import dataclasses

    import torch

    from dfkd_assets.core.distill import distill
    from dfkd_assets.loaders import distill_settings, fresh_student

    classes = [f"class{i}" for i in range(len(cfg.classes))]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, image_size, image_size, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(len(classes), (n_images,), generator=g)
    head = torch.nn.functional.normalize(torch.randn(len(classes), _targets(teacher, 1).shape[-1], generator=g), dim=-1).to(device)
    base = dataclasses.replace(distill_settings(cfg, device), epochs=epochs)
    if batch_size:
        base = dataclasses.replace(base, batch_size=batch_size)
    steps = epochs * -(-n_images // base.batch_size)
    out = {"images": n_images, "epochs": epochs, "steps": steps, "student": cfg.student.arch, "model_kwargs": cfg.student.model_kwargs,
           "input_size": cfg.student.input_size, "batch_size": base.batch_size, "bf16": base.bf16}
    online = dataclasses.replace(base, teacher_views=0)
    variants = {"augmented": online, "cached_teacher_logits": dataclasses.replace(online, augment=False),
                "view_pool": dataclasses.replace(online, teacher_views=base.teacher_views or 4)}
    out["view_pool_views"] = variants["view_pool"].teacher_views
    for name, s in variants.items():
        clock = StageClock(device)
        with tempfile.TemporaryDirectory() as tmp:
            _, dt = _timed(lambda s=s, name=name, clock=clock: distill(fresh_student(cfg, classes), teacher, head, images, labels, s, Path(tmp), name,
                                                                       clock=clock), device)
        out[f"{name}_images_per_s"] = n_images * epochs / dt
        out[f"{name}_steps_per_s"] = steps / dt
        if name == "augmented":
            total = sum(clock.seconds.values())
            out["step_share"] = {k: v / total for k, v in sorted(clock.seconds.items(), key=lambda kv: -kv[1])}
            out["step_seconds"] = total / steps
        if name == "view_pool":  # made once before the first step (the clock's `view_pool` stage), then only the student runs
            out["view_pool_build_s"] = clock.seconds["view_pool"]
            out["view_pool_train_steps_per_s"] = steps / (dt - clock.seconds["view_pool"])
    return out


def bench_load(cfg, device, teacher, vqgan, engine_images_per_s_at_400: float, partition_images: int) -> dict:
    """Write the models' weights as the pipeline reads them, then time a partition's loading."""
    import torch
    from safetensors.torch import save_file

    from dfkd_assets.core.teacher import load_teacher
    from dfkd_assets.core.vqgan import load_vqgan

    with tempfile.TemporaryDirectory() as tmp:
        tw = Path(tmp) / "teacher.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in teacher.model.state_dict().items()}, str(tw))
        gw = Path(tmp) / "vqgan.ckpt"
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in vqgan.state_dict().items()}}, gw)
        t = cfg.teacher
        _, t_teacher = _timed(lambda: load_teacher(t.model_name, str(tw), t.model_config_file, 0, device), device)
        _, t_vqgan = _timed(lambda: load_vqgan(cfg.generator.config_file, gw, 0, device), device)
        sizes = {"teacher_mib": tw.stat().st_size / 2**20, "vqgan_mib": gw.stat().st_size / 2**20}
    compute = partition_images / engine_images_per_s_at_400
    return {"teacher_load_s": t_teacher, "vqgan_load_s": t_vqgan, **sizes, "partition_images": partition_images,
            "partition_compute_s_at_400_steps": compute, "load_share_of_compute": (t_teacher + t_vqgan) / compute}


def call_times(fn, x, n: int, warm: int) -> list[float]:
    """Seconds of each of `n` calls fn(x) after `warm` untimed ones, under inference mode."""
    import torch

    with torch.inference_mode():
        for _ in range(warm):
            fn(x)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t0)
    return out


def bench_latency(cfg, teacher, students: list[str], input_size: int, batches=(1, 32), repeats: int = 10) -> dict:
    """CPU latency (ms per batch, median of `repeats`): students (eager, ONNX Runtime) vs the teacher's image encoder."""
    import statistics

    import numpy as np
    import onnxruntime as ort
    import torch

    from dfkd_assets.core.export import export_onnx
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.teacher import load_teacher

    cpu = torch.device("cpu")
    t = cfg.teacher
    cpu_teacher = load_teacher(t.model_name, None, t.model_config_file, 0, cpu) if teacher.device.type != "cpu" else teacher

    def median_ms(fn, x):
        return 1000 * statistics.median(call_times(fn, x, repeats, warm=1))

    rows = []
    for b in batches:
        x = torch.rand(b, 3, input_size, input_size)
        rows.append({"model": f"teacher image encoder ({t.model_name})", "runtime": "pytorch", "batch": b,
                     "ms": median_ms(cpu_teacher.encode_images, torch.rand(b, 3, cpu_teacher.image_size, cpu_teacher.image_size))})
        for arch in students:
            student = build_student(arch, cfg.classes, input_size, 0).eval()
            rows.append({"model": arch, "runtime": "pytorch", "batch": b, "ms": median_ms(student, x)})
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(student, Path(tmp) / "s.onnx")
                sess = ort.InferenceSession(str(Path(tmp) / "s.onnx"), providers=["CPUExecutionProvider"])
            xn = np.ascontiguousarray(x.numpy())
            rows.append({"model": arch, "runtime": "onnxruntime", "batch": b,
                         "ms": median_ms(lambda v, sess=sess: sess.run(["logits"], {"images": v}), xn)})
    for r in rows:
        ref = next(q["ms"] for q in rows if q["batch"] == r["batch"] and q["model"].startswith("teacher"))
        r["speedup_vs_teacher"] = ref / r["ms"]
    return {"input_size": input_size, "torch_threads": torch.get_num_threads(), "rows": rows}


class _ArrayCalibration:
    """onnxruntime CalibrationDataReader over arrays already in memory (the deploy section's timing-only int8 models)."""

    def __init__(self, batches):
        self.batches, self.it = list(batches), None

    def get_next(self):
        self.it = self.it or iter(self.batches)
        x = next(self.it, None)
        return None if x is None else {"images": x}


def _macs(fn, x, module=None) -> int:
    """Multiply-accumulates of one call (torch.utils.flop_counter: convolutions, matmuls, attention; FLOPs / 2).
    The MultiheadAttention modules of `module` run their training-mode path meanwhile (no dropout in
    these models): the inference fast path (torch._native_multi_head_attention) is invisible to the counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mha = [m for m in (module.modules() if module is not None else ()) if isinstance(m, torch.nn.MultiheadAttention) and not m.training]
    for m in mha:
        m.training = True
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(x)
    finally:
        for m in mha:
            m.training = False
    return counter.get_total_flops() // 2


def _timings(fn, make_input, threads: int, repeats: int, batch: int = 32) -> dict:
    """Batch-1 latency p50/p99 (ms, `repeats` calls after 3 warm-ups) and batch-`batch` throughput
    (images/s, median of max(3, repeats // 5) calls after one warm-up) with `threads` threads."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    x1, xb = make_input(1), make_input(batch)

    t1, tb = np.asarray(call_times(fn, x1, repeats, warm=3)), np.asarray(call_times(fn, xb, max(3, repeats // 5), warm=1))
    return {f"b1_p50_ms_{threads}t": 1000 * float(np.percentile(t1, 50)), f"b1_p99_ms_{threads}t": 1000 * float(np.percentile(t1, 99)),
            f"b{batch}_images_per_s_{threads}t": batch / float(np.median(tb))}


def bench_deploy_shape(label: str, teacher, classes: list[str], arch: str, input_size: int, model_kwargs: dict | None,
                       threads=(1, 2), repeats: int = 20) -> list[dict]:
    """The four deployment rows of one shape: teacher image tower + zero-shot head (PyTorch), the
    student in fp32 (PyTorch, ONNX Runtime) and in int8 (ONNX Runtime)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from dfkd_assets.core.export import export_onnx, onnx_session
    from dfkd_assets.core.quantize import QuantizationSettings, quantize_int8
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.teacher import teacher_logits

    g = torch.Generator().manual_seed(0)
    head = torch.nn.functional.normalize(torch.randn(len(classes), teacher.encode_images(torch.rand(1, 3, 8, 8)).shape[-1], generator=g), dim=-1)
    student = build_student(arch, classes, input_size, 0, model_kwargs=model_kwargs).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tw, sw, fp32, int8 = (Path(tmp) / n for n in ("teacher.safetensors", "student.safetensors", "fp32.onnx", "int8.onnx"))
        save_file({**{k: v.detach().contiguous() for k, v in teacher.model.visual.state_dict().items()}, "head": head}, str(tw))
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(sw))
        export_onnx(student, fp32)
        calib = _ArrayCalibration(torch.rand(4, 8, 3, input_size, input_size, generator=g).numpy())
        quantize_int8(fp32, int8, calib, QuantizationSettings(32, True, "minmax", "uint8", 1.0, qat_epochs=0, qat_lr=0.0))
        t_params = sum(p.numel() for p in teacher.model.visual.parameters()) + head.numel()
        s_params = sum(p.numel() for p in student.parameters())
        t_in = lambda b: torch.rand(b, 3, teacher.image_size, teacher.image_size)  # noqa: E731
        s_in = lambda b: torch.rand(b, 3, input_size, input_size)  # noqa: E731
        s_macs = _macs(student, s_in(1))
        models = [
            (f"teacher image tower + zero-shot head ({teacher.teacher_id.split(':')[0]}, {teacher.image_size} px)", "pytorch fp32", tw, t_params,
             _macs(lambda x: teacher_logits(teacher, head, x), t_in(1), teacher.model), lambda th: (lambda x: teacher_logits(teacher, head, x)), t_in),
            (f"student {arch} ({input_size} px)", "pytorch fp32", sw, s_params, s_macs, lambda th: student, s_in),
        ]
        for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
            def ort_fn(th, path=path):
                sess = onnx_session(path, th)
                return lambda x: sess.run(["logits"], {"images": x})
            models.append((f"student {arch} ({input_size} px)", name, path, s_params, s_macs, ort_fn,
                           lambda b: np.random.default_rng(0).random((b, 3, input_size, input_size), dtype=np.float32)))
        for model, runtime, path, params, macs, make_fn, make_input in models:
            row = {"shape": label, "model": model, "runtime": runtime, "file_mib": path.stat().st_size / 2**20, "params_m": params / 1e6,
                   "gmacs_per_image": macs / 1e9}
            for th in threads:
                row.update(_timings(make_fn(th), make_input, th, repeats))
            rows.append(row)
    for r in rows:
        teacher_row, ort_fp32 = rows[0], next(q for q in rows if q["runtime"] == "onnxruntime fp32")
        r["b1_speedup_vs_teacher_1t"] = teacher_row["b1_p50_ms_1t"] / r["b1_p50_ms_1t"]
        r["b1_latency_vs_ort_fp32_1t"] = r["b1_p50_ms_1t"] / ort_fp32["b1_p50_ms_1t"]
    return rows


def bench_deploy(cfg, teacher, repeats: int, threads=(1, 2)) -> dict:
    """Both shapes: the settings' (student.arch, model_kwargs, input_size; the settings' teacher) and the
    paper's (ResNet-18 at 224 px against ViT-B-32, random weights: cost does not depend on them)."""
    import torch

    from dfkd_assets.core.teacher import load_teacher

    cpu = torch.device("cpu")
    t = cfg.teacher
    own = load_teacher(t.model_name, None, t.model_config_file, 0, cpu) if teacher.device.type != "cpu" else teacher
    shapes = [("settings", own, cfg.student.arch, cfg.student.input_size, cfg.student.model_kwargs),
              ("paper", load_teacher("ViT-B-32", None, None, 0, cpu), "resnet18", 224, None)]
    before = torch.get_num_threads()
    try:
        rows = [r for label, tt, arch, size, kw in shapes for r in bench_deploy_shape(label, tt, cfg.classes, arch, size, kw, threads, repeats)]
    finally:
        torch.set_num_threads(before)
    return {"classes": len(cfg.classes), "threads": list(threads), "repeats": repeats, "cpu_flags": _cpu_flags(), "rows": rows}


def _cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags (AVX*, AMX*, VNNI), from /proc/cpuinfo: what int8 speed depends on."""
    try:
        words = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted({w for w in words if re.match(r"avx|amx|.*vnni", w)})


def _print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n## {title}")
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        print(" | ".join(cells))


def synthesis_flops(cfg, teacher, vqgan, device) -> dict:
    """FLOPs one run's synthesis spends (matmul/conv/attention, forward + backward): images x steps x
    FLOPs per image-step, the step being the decoder pass plus `cutn` views through the image tower
    (the prompt bank and each image's final clean encoding are left out: the same for every schedule
    and under 1 % here)."""
    from dfkd_assets.loaders import synthesis_settings

    s = synthesis_settings(cfg, device)
    per_step = count_step_flops(teacher, vqgan, 2, s)[0] / 2
    images = cfg.synthesis.images_per_class * len(cfg.classes)
    return {"images": images, "iterations": s.iterations, "cutn": s.cutn, "flops_per_image_step": per_step,
            "flops": images * s.iterations * per_step}


def equal_accuracy(summary: dict, baseline: str) -> dict:
    """For every schedule: does its mean top-1 over seeds reach the baseline's, within the baseline's
    seed spread (mean >= baseline mean - baseline std), and the baseline's synthesis FLOPs and KD wall
    time (`distill_s`, mean over seeds, where recorded) over its own. `compute_ratio_at_equal_accuracy`
    and `kd_time_ratio_at_equal_accuracy` are the largest ratios among the schedules that reach it."""
    base = summary[baseline]
    base_mean, base_std = base["mean"]
    out = {}
    for name, r in summary.items():
        out[name] = {"reaches_baseline": r["mean"][0] >= base_mean - base_std,
                     "compute_ratio": base["synthesis_flops"] / r["synthesis_flops"]}
        if "distill_s" in r and "distill_s" in base:
            out[name]["kd_time_ratio"] = base["distill_s"] / r["distill_s"]
    reached = [v for v in out.values() if v["reaches_baseline"]]
    result = {"threshold": base_mean - base_std, "schedules": out, "compute_ratio_at_equal_accuracy": max(v["compute_ratio"] for v in reached)}
    if all("kd_time_ratio" in v for v in out.values()):  # every schedule's KD timed from scratch
        result["kd_time_ratio_at_equal_accuracy"] = max(v["kd_time_ratio"] for v in reached)
    return result


def bench_quality(cfg_path, overrides: dict, schedules: list[list[str]], seeds: list[int], work: Path, png: Path | None, device) -> dict:
    """Each schedule at each seed: prompt bank, synthesis, KD and evaluation by `compare.run_one`
    (synthesis and KD state resumable under `work/<schedule>`), with the synthesis FLOPs it spent."""
    import numpy as np

    from dfkd_assets.config import deep_merge, load_config
    from dfkd_assets.core.evaluation import transfer_ratio
    from dfkd_assets.loaders import generator_for
    from dfkd_assets.stages.evaluation import seed_summary
    from dfkd_assets.tools.compare import parse_sets, run_one, teacher_reference

    named = {}
    for name, *sets in schedules:
        if name in named:
            raise ValueError(f"--schedule {name} is given twice")
        named[name] = load_config(cfg_path, deep_merge(overrides, parse_sets(sets)))
    cfg0 = next(iter(named.values()))
    teacher, head, sets, teacher_top1 = teacher_reference(cfg0)
    vqgan = generator_for(cfg0, device)
    runs, flops = [], {}
    for name, cfg in named.items():
        flops[name] = synthesis_flops(cfg, teacher, vqgan, device)
        for seed in seeds:
            r = run_one(cfg, cfg.prompts.method, seed, work / name, teacher, head, sets, print)
            r.pop("grid")
            runs.append({**r, "method": name, "schedule": sets_of(schedules, name)})
    chance = 1 / len(cfg0.classes)
    summary, table = seed_summary(runs, teacher_top1, chance)
    for name in named:
        summary[name]["synthesis_flops"] = flops[name]["flops"]
        fresh = [r["distill_s"] for r in runs if r["method"] == name and not r["distill_resumed"]]  # a resumed KD's time is not the training's
        if fresh:
            summary[name]["distill_s"] = float(np.mean(fresh))  # KD wall time, incl. a view pool's build
        summary[name]["per_run_transfer"] = [
            float(np.nanmean([transfer_ratio(r["top1"][d], teacher_top1[d], chance) for d in teacher_top1])) for r in runs if r["method"] == name]
    out = {"seeds": seeds, "teacher": teacher_top1, "chance": chance, "synthesis": flops, "runs": runs, "summary": summary,
           "table": table, **equal_accuracy(summary, next(iter(named)))}
    if png is not None:
        write_quality_png(png, summary, next(iter(named)))
        out["png"] = str(png)
    return out


def sets_of(schedules: list[list[str]], name: str) -> list[str]:
    return next(s[1:] for s in schedules if s[0] == name)


def write_quality_png(path: Path, summary: dict, baseline: str) -> None:
    """Mean top-1 (+- std over seeds) against synthesis GFLOPs, one point per schedule, the baseline's band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dfkd_assets.core.report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    m, sd = summary[baseline]["mean"]
    ax.axhspan(m - sd, m + sd, color="0.85", label=f"{baseline} mean +- std")
    for name, r in summary.items():
        ax.errorbar(r["synthesis_flops"] / 1e12, r["mean"][0], yerr=r["mean"][1], marker="o", capsize=3)
        ax.annotate(name, (r["synthesis_flops"] / 1e12, r["mean"][0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("synthesis compute (TFLOP, all images)")
    ax.set_ylabel("student mean top-1 over domains")
    ax.legend(fontsize=8)
    save_figure(fig, path)


@dataclasses.dataclass
class _Bench:
    """What every section reads: the parsed arguments, the settings and device they chose, the models
    (built once for all sections), the batch and image counts, and the results so far (the flops and
    load sections read the synthesis section's timings from it)."""

    a: argparse.Namespace
    cfg: object
    overrides: dict
    device: object
    teacher: object
    vqgan: object
    peak: float | None
    batch: int
    images: int
    result: dict


def _section_synthesis(b: _Bench) -> dict:
    out = bench_synthesis(b.cfg, b.device, b.teacher, b.vqgan, b.images, b.batch, b.a.iters, b.a.compile_modes)
    _print_table(f"synthesis: {b.images} images, {b.a.iters} iterations, cutn {out['cutn']}, {out['image_size']} px",
                 out["rows"], ["variant", "batch", "images_per_s", "images_per_hour_at_400_steps", "speedup_vs_reference",
                               "cosine", "max_cosine_diff_vs_reference", "warmup_seconds"])
    return out


def _section_flops(b: _Bench) -> dict:
    if "rows" not in b.result.get("synthesis", {}):
        raise RuntimeError("the flops section needs the synthesis section's timings")
    out = bench_flops(b.result["synthesis"], b.teacher, b.vqgan, b.cfg, b.device, b.batch, b.peak)
    _print_table(f"flops: {out['flops_per_image_step'] / 1e9:.1f} GFLOP per image-step, peak {b.peak} TFLOP/s",
                 out["rows"], ["variant", "tflops_per_step", "achieved_tflops", "mfu"])
    return out


def _section_profile(b: _Bench) -> dict:
    mode = b.a.compile_modes[0] if b.a.compile_modes else None
    out = bench_profile(b.cfg, b.device, b.teacher, b.vqgan, b.batch, b.a.profile_steps, mode, b.a.trace)
    print(f"\n## profile: {out['timer']}, batch {b.batch}, {out['wall_seconds_per_step']:.4g} s/step"
          f"{' compiled (' + mode + ')' if mode else ''}")
    print("  ".join(f"{k} {v:.1%}" for k, v in out["by_kind"].items()))
    _print_table("profile: top kernels/operators", [dict(r, name=r["name"][:70]) for r in out["top"][:12]], ["name", "kind", "calls", "seconds", "share"])
    return out


def _section_distill(b: _Bench) -> dict:
    out = bench_distill(b.cfg, b.device, b.teacher, b.a.distill_images, b.a.distill_epochs, b.cfg.synthesis.image_size, b.a.distill_batch)
    print(f"\n## distill: {json.dumps(out)}")
    return out


def _section_load(b: _Bench) -> dict:
    if "rows" not in b.result.get("synthesis", {}):
        raise RuntimeError("the load section needs the synthesis section's engine speed")
    best = max(r["images_per_hour_at_400_steps"] for r in b.result["synthesis"]["rows"]) / 3600
    out = bench_load(b.cfg, b.device, b.teacher, b.vqgan, best, b.a.partition_images)
    print(f"\n## load: {json.dumps(out)}")
    return out


def _section_quality(b: _Bench) -> dict:
    a = b.a
    out = bench_quality(a.config, b.overrides, a.schedule or [["today"]], a.seeds, a.work,
                        a.json.with_suffix(".png") if a.json else None, b.device)
    print("\n## quality: synthesis compute and student accuracy\n" + out["table"])
    kd = out.get("kd_time_ratio_at_equal_accuracy")
    print(f"compute_ratio_at_equal_accuracy {out['compute_ratio_at_equal_accuracy']:.2f}, kd_time_ratio_at_equal_accuracy "
          + (f"{kd:.2f}" if kd is not None else "n/a (a schedule's KD resumed from --work)")
          + f" (threshold mean top-1 {out['threshold']:.3f}); KD s "
          + ", ".join(f"{k} {v.get('distill_s', float('nan')):.0f}" for k, v in out["summary"].items()) + "; "
          + ", ".join(f"{k} {v['flops'] / 1e12:.2f} TFLOP" for k, v in out["synthesis"].items()))
    return out


def _section_latency(b: _Bench) -> dict:
    out = bench_latency(b.cfg, b.teacher, b.a.students, b.a.latency_size or b.cfg.student.input_size)
    _print_table(f"CPU latency at {out['input_size']} px, {out['torch_threads']} threads (ms per batch)",
                 out["rows"], ["model", "runtime", "batch", "ms", "speedup_vs_teacher"])
    return out


def _section_deploy(b: _Bench) -> dict:
    out = bench_deploy(b.cfg, b.teacher, b.a.deploy_repeats)
    cols = ["shape", "model", "runtime", "file_mib", "params_m", "gmacs_per_image"]
    for th in out["threads"]:
        cols += [f"b1_p50_ms_{th}t", f"b1_p99_ms_{th}t", f"b32_images_per_s_{th}t"]
    _print_table("edge deployment: teacher vs student fp32/int8 on this CPU", out["rows"], cols + ["b1_latency_vs_ort_fp32_1t", "b1_speedup_vs_teacher_1t"])
    return out


# each section measures, prints its table and returns its numbers; run() times it and keeps going on failure
_SECTIONS = {"synthesis": _section_synthesis, "flops": _section_flops, "profile": _section_profile, "distill": _section_distill,
             "load": _section_load, "quality": _section_quality, "latency": _section_latency,
             "deploy": _section_deploy}


def _settings_for(a) -> tuple[object, dict]:
    """The settings the bench measures (the config with --device/--cutn applied) and those overrides
    (the quality section re-applies them to every schedule). Sets the Inductor cache first, so that
    every compile in this process, and the ones `dfkd compare` starts, uses it."""
    from dfkd_assets.config import load_config

    if a.inductor_cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(a.inductor_cache.resolve())
    elif a.compile_modes:  # a cold start unless asked otherwise: an earlier run's cache would hide the warm-up
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfkd-bench-inductor-")
    overrides = {"device": a.device} if a.device else {}
    if a.cutn:
        overrides["synthesis"] = {"cutn": a.cutn}
    return load_config(a.config, overrides or None), overrides


def _peak_tflops(a, device) -> float | None:
    """The MFU denominator: --peak-tflops, else the datasheet bf16 peak of a known GPU, else None (no MFU)."""
    import torch

    if a.peak_tflops is None and device.type == "cuda":
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    return a.peak_tflops


def _save(a, result: dict) -> None:
    """Write the results so far to --json (after every section, so a crash keeps the finished ones)."""
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


def run(a) -> dict:
    """Build the models once, then run each requested section in order; a failing section records its
    error and the others still run."""
    from dfkd_assets.core.devices import resolve_device
    from dfkd_assets.loaders import generator_for, teacher_for

    cfg, overrides = _settings_for(a)
    device = resolve_device(cfg.device)
    result = {"command": "dfkd bench " + " ".join(a.argv), "config": str(a.config), "machine": _machine(device),
              "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    (teacher, vqgan), t_load = _timed(lambda: (teacher_for(cfg, device), generator_for(cfg, device)), device)
    result["model_build_s"] = t_load
    batch = a.batch or cfg.synthesis.batch_size
    b = _Bench(a, cfg, overrides, device, teacher, vqgan, _peak_tflops(a, device), batch, a.images or batch, result)
    for section in a.sections:
        t0 = time.perf_counter()
        try:
            out = _SECTIONS[section](b)
            out["section_seconds"] = time.perf_counter() - t0
            result[section] = out
        except Exception as e:  # keep the other sections' numbers
            result[section] = {"error": f"{type(e).__name__}: {e}"}
            print(f"\n## {section}: FAILED {type(e).__name__}: {e}")
        _save(a, result)
    return result


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="dfkd bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "ci.yaml",
                   help="models and settings to measure (configs/paper-smoke.yaml = paper shapes, random weights)")
    p.add_argument("--device", default=None, help="override the config's device (auto|cpu|cuda|cuda:N)")
    p.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=SECTIONS)
    p.add_argument("--images", type=int, default=None, help="images per synthesis variant (default: one batch)")
    p.add_argument("--batch", type=int, default=None, help="engine batch size (default: synthesis.batch_size)")
    p.add_argument("--cutn", type=int, default=None, help="override synthesis.cutn (the paper: 32)")
    p.add_argument("--iters", type=int, default=10, help="optimisation steps per image (rates are per step; x/400 for the paper)")
    p.add_argument("--compile", action="store_true", help="also measure the engine with torch.compile (= --compile-modes default)")
    p.add_argument("--compile-modes", nargs="+", default=[], choices=COMPILE_MODES,
                   help="torch.compile modes to measure (each its own variant); the first one is also profiled")
    p.add_argument("--inductor-cache", type=Path, default=None,
                   help="TORCHINDUCTOR_CACHE_DIR for the compiled variants (default: a new, empty one, i.e. a cold start)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler")
    p.add_argument("--trace", type=Path, default=None, help="write the profile section's Chrome trace here")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: datasheet bf16 peak of known GPUs)")
    p.add_argument("--distill-images", type=int, default=512)
    p.add_argument("--distill-epochs", type=int, default=2)
    p.add_argument("--distill-batch", type=int, default=None, help="KD batch size (default: distill.batch_size)")
    p.add_argument("--partition-images", type=int, default=64, help="images per class partition for the load share")
    p.add_argument("--students", nargs="+", default=["resnet18", "mobilenetv3_large_100"])
    p.add_argument("--latency-size", type=int, default=None, help="student input side for latency (default: student.input_size)")
    p.add_argument("--deploy-repeats", type=int, default=20, help="deploy: batch-1 calls per row and thread count (batch 32: a fifth, at least 3)")
    p.add_argument("--schedule", nargs="+", action="append", default=None, metavar=("NAME", "KEY=VALUE"),
                   help="quality: a named synthesis schedule as settings overrides, e.g. --schedule short synthesis.iterations=6 "
                        "synthesis.lr=0.3; repeat it; the first is the baseline (default: the config as it is, named today)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="quality: seeds of every schedule")
    p.add_argument("--work", type=Path, default=Path("storage/bench-quality"),
                   help="quality: resumable synthesis and KD state, a folder per schedule (a re-run with more schedules reuses it)")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here (quality: and its PNG curve beside it)")
    a = p.parse_args(argv)
    a.argv = argv
    if a.compile and "default" not in a.compile_modes:
        a.compile_modes.insert(0, "default")
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
