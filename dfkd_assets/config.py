"""Every setting of the pipeline, as one pydantic model tree.

Why one tree: a run is fully described by one validated object whose hash goes into Dagster
metadata, MLflow tags and DVC params, so a model version leads back to exactly what produced it.
Models forbid unknown keys, so a typo fails loudly with the dotted key path instead of being
silently ignored. This module imports only pydantic/yaml: Dagster loads it at definition time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dfkd_assets.core.names import RESERVED_CLASS_NAMES, class_key, clean_class_name
from dfkd_assets.redaction import redact

DEFAULT_CONFIG = "configs/demo.yaml"
CONFIG_ENV = "DFKD_CONFIG"


def _leaf_types(annotation) -> set:
    """The scalar types an annotation admits (`int | None` -> {int, NoneType}); containers count as themselves."""
    origin = get_origin(annotation)
    if origin is None:
        return {annotation}
    if origin in (Union, types.UnionType, Annotated):
        args = get_args(annotation)[:1] if origin is Annotated else get_args(annotation)
        return set().union(*(_leaf_types(a) for a in args))
    return {origin}


def _check_formats(template: str) -> str:
    """A template is filled with str.format: any other '{...}' field would fail only when the first
    prompt is built, far from the setting; refused here (write literal braces as '{{' '}}')."""
    try:
        template.format("class")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{template!r} cannot be filled with a class name ({type(e).__name__}: {e}); only '{{}}' is a field") from None
    return template


def _marked(default, flags: dict, kw: dict):
    extra = {**kw.pop("json_schema_extra", {}), **flags}
    return Field(default, json_schema_extra=extra, **kw)


def scheduling_only(default, **kw):
    """Declare a setting that changes how results are computed (batching, memory layout,
    compilation), not which results: shard fingerprints leave such settings out."""
    return _marked(default, {"scheduling_only": True}, kw)


def orchestration_only(default, **kw):
    """Declare a setting that the stages and assets read (how many images, which method, which
    seed a shard starts from), not a core settings object: the settings completeness test
    (tests/test_config.py) checks every other field of a mapped section reaches core/."""
    return _marked(default, {"orchestration_only": True}, kw)


def _fields_flagged(model: type[BaseModel], flag: str) -> set[str]:
    return {k for k, f in model.model_fields.items() if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(flag)}


def scheduling_fields(model: type[BaseModel]) -> set[str]:
    """The fields of `model` declared with `scheduling_only`."""
    return _fields_flagged(model, "scheduling_only")


def orchestration_fields(model: type[BaseModel]) -> set[str]:
    """The fields of `model` declared with `orchestration_only`."""
    return _fields_flagged(model, "orchestration_only")


class SettingsModel(BaseModel):
    """Base of every settings section: unknown keys fail, values are frozen, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_type_coercion(cls, v, info):
        """pydantic's lax mode reads `true` as 1 and `"8"` as 8; in a YAML file both are type
        mistakes (a flag where a count belongs, a quoted number), so they are refused by name."""
        leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and bool not in leaves and leaves & {int, float}:
            raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
        if isinstance(v, str) and leaves and leaves <= {int, float, type(None)}:
            raise ValueError(f"expected a number, got the string {v!r} (remove the quotes)")
        return v


class TeacherConfig(SettingsModel):
    """CLIP teacher (docs/ALGORITHM.md §1), loaded through open_clip."""

    model_name: str = Field("ViT-B-32", description="open_clip architecture, or 'local-dir:/path' to an open_clip bundle (open_clip_config.json + weights)")
    pretrained: str | None = Field(
        None,
        description="Local weights file (.pt/.bin/.safetensors) or an open_clip pretrained tag "
        "found in the local cache. None = random init (tests only).",
    )
    model_config_file: Path | None = Field(
        None, description="open_clip JSON model config registered under `model_name` (custom/tiny models)."
    )
    templates: Literal["openai", "simple", "single"] | list[str] = Field(
        "openai",
        description="Zero-shot head templates: the 80 OpenAI ones, open_clip's simple set, 'a photo of a {}.', or a list of '{}' strings.",
    )
    init_seed: int = Field(0, description="Seed for random init when `pretrained` is None.")
    cache_dir: Path | None = Field(
        None, description="Where a pretrained tag's weights are looked up (None: the Hugging Face cache, then ~/.cache/clip)."
    )

    @field_validator("templates")
    @classmethod
    def _templates(cls, v):
        if isinstance(v, list) and (not v or any(t.count("{}") != 1 for t in v)):
            raise ValueError("a template list must be non-empty and every template must contain '{}' once")
        for t in v if isinstance(v, list) else ():
            _check_formats(t)
        return v


class GeneratorConfig(SettingsModel):
    """taming-transformers VQGAN (docs/ALGORITHM.md §3)."""

    config_file: Path = Field(description="taming model yaml (model.params: ddconfig, n_embed, embed_dim).")
    checkpoint: Path | None = Field(None, description="taming .ckpt; None = random init (tests only).")
    init_seed: int = 0


class PromptsConfig(SettingsModel):
    """Prompt bank and its diversification (docs/ALGORITHM.md §2). Defaults marked (r) are reconstructed."""

    method: Literal["vanilla", "mix", "random", "contrastive"] = orchestration_only("contrastive", description="which prompt bank the stage builds")
    vanilla_template: str = orchestration_only("a photo of a {}", description="the prompt of the vanilla bank (one per class)")
    style_template: str = Field("a {style} style of a {}", description="(r) '{style}' = the style token, '{}' = class name")
    positive_template: str = Field("a {}", description="(r) contrastive positive g_k")
    num_styles: int = Field(16, gt=0, description="(r) P styles per class; images of a class are spread evenly over them")
    style_words_file: Path | None = Field(None, description="Mix-Prompt dictionary, one style per line; None = the packaged one")
    mix_words: int = Field(2, gt=0, description="(r) k words mixed per style")
    mix_alpha: float = Field(1.0, gt=0, description="(r) Dirichlet concentration of the mixing weights")
    steps: int = Field(100, gt=0, description="(r) Adam steps per contrastive style")
    lr: float = Field(0.01, gt=0, description="(r) Adam learning rate of a contrastive style")
    temperature: float = Field(0.1, gt=0, description="(r) InfoNCE temperature tau")
    orthogonality_weight: float = Field(0.0, ge=0, description="(r) PromptStyler style-orthogonality term")
    seed: int = 0

    @field_validator("vanilla_template", "positive_template")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError("must contain exactly one '{}' where the class name goes")
        return _check_formats(v)

    @field_validator("style_template")
    @classmethod
    def _has_style_slot(cls, v: str) -> str:
        if v.count("{style}") != 1 or v.replace("{style}", "").count("{}") != 1:
            raise ValueError("must contain '{style}' once (the style token) and '{}' once (the class name)")
        _check_formats(v.replace("{style}", "*"))
        return v


class SynthesisConfig(SettingsModel):
    """VQGAN-CLIP synthesis (docs/ALGORITHM.md §3); defaults are the public VQGAN-CLIP ones."""

    images_per_class: int = orchestration_only(64, gt=0)
    iterations: int = Field(400, ge=0, description="0 = decode random latents without CLIP guidance (a baseline)")
    lr: float = Field(0.1, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Adam's step size over the iterations: constant (the paper), or cosine decay from lr to 0")
    cutn: int = Field(32, gt=0)
    cut_pow: float = Field(1.0, gt=0)
    image_size: int = Field(224, gt=0, description="Output side in pixels; must be a multiple of the VQGAN factor.")
    noise_start_fraction: float = Field(
        0.0, ge=0, le=1, description="share of images whose latents start from the encoding of a random colour field instead of random "
        "codes (0 = the paper's start; core/synthesis.init_latents): filled, saturated objects on their own colours")
    batch_size: int = scheduling_only(8, gt=0, json_schema_extra={"orchestration_only": True})
    seed: int = orchestration_only(0, description="first image seed of a class (each image's seed derives from it)")
    augment_p: float = Field(0.7, ge=0, le=1, description="Probability of each augmentation per view.")
    noise_max: float = Field(0.1, ge=0)
    channels_last: bool | None = scheduling_only(None, description="NHWC decoder/image tower; None = on CUDA only")
    compile: bool = scheduling_only(False, description="torch.compile the whole synthesis step: faster steps after a warm-up per "
                          "process (share TORCHINDUCTOR_CACHE_DIR between GPU workers to pay it once)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = scheduling_only(
        "default", description="torch.compile mode when synthesis.compile is on (reduce-overhead = CUDA graphs)")
    student_weight: float = Field(
        0.0, ge=0, description="> 0: student-aware synthesis in rounds >= 1 (round 0 has no student yet): each step also rewards, with "
        "this weight, the Jensen-Shannon disagreement between the teacher and the current champion student on the rendered image "
        "(core/synthesis.Competition), so a round adds images the student still gets wrong; 0 = the paper's synthesis. Demo, one "
        "round of 64 per class, 3 seeds: w=1 0.816 +- 0.008, w=0.3 0.819 +- 0.017 mean top-1 against 0.814 +- 0.012 for plain images "
        "(docs/experiments/2026-12-08-student-aware-rounds.md)")


# timm.create_model keywords that read or name files (weights, configs, caches): a student is built from its spec alone
_FILE_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "pretrained_strict", "cache_dir", "features_only"}


class StudentConfig(SettingsModel):
    """Student architecture (docs/ALGORITHM.md §4): any timm model name."""

    @field_validator("model_kwargs")
    @classmethod
    def _no_files(cls, v: dict) -> dict:
        """The registered model rebuilds the network from student.json on any machine: a keyword that
        loads a file (or a string that names a path) would read the host's files there, or fail."""
        bad = sorted(set(v) & _FILE_KWARGS)
        if bad:
            raise ValueError(f"{bad} are not allowed: they load weights or files; the student's weights come from distillation")
        paths = sorted(k for k, x in v.items() if isinstance(x, str) and ("/" in x or "\\" in x or x.startswith("~")))
        if paths:
            raise ValueError(f"{paths} look like file paths; model_kwargs hold architecture values only")
        return v

    arch: str = "resnet18"
    model_kwargs: dict[str, int | float | bool | str | list[int]] = Field(
        default_factory=dict, description="keyword arguments of timm.create_model(arch, ...), e.g. {channels: [32, 64, 128, 256]}: a "
        "ResNet at half width (a quarter of the convolution FLOPs); recorded in student.json, so the registry's model rebuilds it")
    input_size: int = Field(224, gt=0)
    init_seed: int = 0
    head: Literal["logits", "embedding"] = Field(
        "logits", description="logits: a K-class linear head. embedding: the student outputs a vector in the teacher's image-embedding "
        "space and its classifier is the teacher's zero-shot text head of `classes`, kept as data (core/student.EmbeddingStudent), so "
        "`dfkd add-classes` adds a class from its name without re-distilling; needs distill.feature_weight > 0")


class DistillConfig(SettingsModel):
    """Knowledge distillation (docs/ALGORITHM.md §4)."""

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    augment: bool = Field(True, description="False: whole images, no crop/flip/jitter; the teacher's logits are cached once")
    min_crop_scale: float = Field(0.5, gt=0, le=1, description="random-resized-crop lower area bound")
    # Augmentations of the KD input; the teacher labels the augmented image, so they widen what the
    # student learns the teacher on (off by default = the paper's crop + flip).
    color_jitter: float = Field(0.0, ge=0, lt=1, description="brightness/contrast/saturation factor range 1 +- this")
    grayscale_prob: float = Field(0.0, ge=0, le=1)
    blur_prob: float = Field(0.0, ge=0, le=1, description="probability of a 3x3 box blur")
    noise_std: float = Field(0.0, ge=0, le=1, description="Gaussian pixel noise, per-image sigma uniform in [0, this]")
    mixup_alpha: float = Field(0.0, ge=0, description="> 0: mix image pairs with lambda ~ Beta(a, a)")
    cutmix_prob: float = Field(0.0, ge=0, le=1, description="probability of pasting a square from another image")
    zoom_out_prob: float = Field(0.0, ge=0, le=1, description="probability of shrinking the image onto a procedural textured background")
    zoom_out_min_scale: float = Field(0.5, gt=0, le=1, description="smallest shrunk side, as a fraction of the input side")
    zoom_out_background: Literal["procedural", "batch"] = Field(
        "procedural", description="what the shrunk image is placed on: a procedural texture, or a magnified crop of another KD input")
    feature_weight: float = Field(0.0, ge=0, description="> 0: the student also matches the teacher's image embedding of each KD input "
                                  "(weight of 1 - cosine between a linear projection of its pooled features and the teacher's embedding)")
    broad_images: int = orchestration_only(0, ge=0, description="> 0: this many class-name-free KD inputs beside the synthetic images: decoded random "
                              "generator latents (core/synthesis.random_code_images), labelled by the teacher like every KD input; they show an "
                              "embedding student the teacher's space beyond the user's classes, for classes added later by name")
    adversarial_eps: float = Field(0.0, ge=0, le=1, description="> 0: every KD input is moved, within this L-inf radius (pixels in [0, 1]), "
                                   "towards where student and teacher disagree most (PGD on the KD loss; core/distill.adversarial_inputs)")
    adversarial_steps: int = Field(1, gt=0, description="signed-gradient ascent steps of that search")
    teacher_views: int = Field(0, ge=0, description="0: the teacher labels every step's freshly augmented inputs (the paper). K > 0: "
                               "K augmented views per image are made and labelled by the teacher once, before training (FKD's stored "
                               "soft labels), and each epoch draws one per image: only the student runs per step. Memory: K x images "
                               "x 3 x input_size^2 bytes. Needs augment on and adversarial_eps 0. Measured on the demo (450 epochs, 3 seeds): K=4 "
                               "is memorised (train KD loss 0.02) and the student falls to 0.363 +- 0.014 from 0.781 +- 0.012; K=64: 0.765 at "
                               "seed 0 against 0.790 (docs/experiments/2026-12-07-kd-view-pool-quality.md)")
    seed: int = 0
    control: Literal["none", "shuffle_teacher"] = Field(
        "none", description="negative control: 'shuffle_teacher' permutes teacher logits across each batch (student must fall to chance)"
    )


class EvalDatasetConfig(SettingsModel):
    name: str
    root: Path = Field(description="DomainBed layout: root/<domain>/<class>/*.(jpg|png)")
    preset: Literal["pacs", "vlcs", "officehome", "imageclef", "visda2017"] | None = Field(
        None, description="Known benchmark layout: its domain folders and class-folder -> prompt-name map (core/datasets.py)"
    )
    domains: list[str] | None = Field(None, description="Subset of domains; None = the preset's, else every folder under root.")
    class_map: dict[str, str] = Field(default_factory=dict, description="folder name -> class name (over the preset's map)")
    other_classes: Literal["error", "skip"] = Field(
        "error", description="class folders that are not in `classes`: an error, or skipped (evaluate on a subset of the benchmark's classes)"
    )


class EvaluationConfig(SettingsModel):
    datasets: list[EvalDatasetConfig] = Field(default_factory=list)
    batch_size: int = Field(64, gt=0)
    max_images_per_class: int | None = Field(None, gt=0)


class FewShotConfig(SettingsModel):
    """Few-shot protocol (docs/ALGORITHM.md §5): k labelled images per class of a domain, test on the rest of it."""

    enabled: bool = orchestration_only(False, description="adds the few_shot_report asset to the graph")
    shots: list[int] = Field([1, 5, 10], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    steps: int = Field(100, gt=0, description="fine-tuning SGD steps per (start, domain, k, seed)")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(32, gt=0)
    imagenet_weights: Path | None = orchestration_only(
        None, description="local timm weights of student.arch (.safetensors/.pth) for an 'imagenet' start; None = distilled and scratch only"
    )

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("shots must be positive")
        return sorted(set(v))


class PromotionConfig(SettingsModel):
    metric: Literal["student_mean_top1"] = Field(
        "student_mean_top1", description="the score of metrics.json a challenger is promoted on (the mean over domains of top-1; "
        "against a champion serving other classes, its value on the classes both serve): the one score with a champion counterpart")
    tolerance: float = Field(0.01, ge=0, description="A challenger may be this much worse and still promote.")


class ChecksConfig(SettingsModel):
    """Thresholds of the asset checks (defs/checks.py); the ones guarding the registry are blocking."""

    min_teacher_agreement: float = Field(
        0.5, ge=0, le=1, description="least fraction of synthetic images the teacher assigns to the class they were made for"
    )


class OperationsConfig(SettingsModel):
    """How the pipeline runs for months: schedules, sensors, retries, limits (defs/automation.py)."""

    retrain_cron: str = Field("0 3 * * 1", description="schedule `retrain` (cron, e.g. Mondays 03:00)")
    timezone: str = "UTC"
    sensor_interval_s: int = Field(60, ge=5, description="how often `stale_partitions` compares settings with what exists")
    webhook_url_env: str = Field("DFKD_FAILURE_WEBHOOK", description="environment variable holding the failure webhook URL (never stored in config)")
    max_retries: int = Field(2, ge=0, description="retries of a GPU step after a transient error (bad input is never retried)")
    retry_delay_s: float = Field(30, ge=0)
    max_runtime_s: int = Field(24 * 3600, gt=0, description="Dagster run monitoring cancels a run of a pipeline job after this long")
    images_per_round: int | None = Field(
        None, gt=0, description="new images per class each `retrain` run synthesizes (a round, fresh seeds) before it trains on the "
        "union of all rounds; None = no rounds: `retrain` re-distils the current snapshot (docs/ARCHITECTURE.md, rounds)")
    max_images_per_class: int | None = Field(
        None, gt=0, description="cap on a class's images over all rounds: at the cap growth stops and `retrain` skips (None = no cap); "
        "a cap below what exists is an error, nothing is deleted (`dfkd rounds drop`)")
    warm_start: bool = Field(False, description="a round's student starts from the champion's weights (same arch and classes) instead of its init")

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("must be a 5-field cron expression, e.g. '0 3 * * 1'")
        return v

    @model_validator(mode="after")
    def _round_fits_cap(self) -> "OperationsConfig":
        if self.images_per_round and self.max_images_per_class and self.images_per_round > self.max_images_per_class:
            raise ValueError(f"operations.images_per_round ({self.images_per_round}) is above operations.max_images_per_class "
                             f"({self.max_images_per_class}): no round could ever be made")
        return self


class QuantizationConfig(SettingsModel):
    """Post-training int8 quantization of the champion's ONNX export (asset `champion_int8`, core/quantize.py),
    calibrated on the synthetic shards only; registered as `<name>-onnx-int8` when no domain loses more
    than `max_top1_drop` top-1 against the fp32 export (a blocking check)."""

    enabled: bool = orchestration_only(False, description="adds the champion_int8 asset to the graph (it runs after champion_onnx)")
    calibration_images: int = Field(1024, gt=0, description="synthetic images (round-robin over classes and rounds) that calibrate the "
                                    "activation ranges; fewer when the snapshot holds fewer (demo students, 3 seeds: all 768 gave a mean "
                                    "drop of 0.17 points against 0.42 with 512; docs/BENCHMARKS.md)")
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field("minmax", description="ONNX Runtime's calibration method")
    activations: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type (weights are int8): uint8 runs natively on x86 (VNNI/AVX2 u8 x s8 dot products); "
        "int8 where uint8 saturates (AVX2 without VNNI) or the target prefers it")
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="most top-1 (fraction: 0.01 = 1 point) int8 may lose against fp32 on "
                                 "any evaluation domain before the check blocks the registration")
    qat_epochs: int = Field(0, ge=0, description="> 0: quantization-aware fine-tuning first (core/qat.py): a copy of the champion is distilled "
                            "this many more epochs from the teacher's soft labels on the synthetic images (distill.* augmentation, "
                            "temperature, batch size) with the int8 model's rounding simulated, then quantized as without it; int8 is "
                            "still compared with the original champion's fp32. 0: post-training quantization only. Demo students, 3 seeds: 5 epochs "
                            "(qat_lr 1e-4) put every domain within 1 point (worst drop 0.83, mean 0.17) where PTQ alone misses by one "
                            "domain (1.25, mean 0.17), but the fine-tune itself moves real-domain top-1 by up to 1.7 points: a reshuffle of "
                            "a few images, not a systematic gain (docs/BENCHMARKS.md, int8 section)")
    qat_lr: float = Field(1e-4, gt=0, description="initial learning rate of the quantization-aware fine-tune (SGD, distill.momentum and "
                          "weight_decay, cosine to 0). BatchNorm is folded, so the weights have no normalisation to absorb a step: demo "
                          "student seed 0, one epoch at 0.01 fell from 0.88 to 0.66 agreement with the teacher; 1e-3 and 3e-3 moved the "
                          "real-domain top-1 by 1 to 5 points; 1e-4 for 5 epochs by at most 1.7 over 3 seeds (docs/BENCHMARKS.md)")


class MlflowConfig(SettingsModel):
    tracking_uri: str = Field(
        "sqlite:///{workspace}/storage/mlflow.db",
        description="'{workspace}' and '{env:NAME}' are substituted; put a password in the environment, e.g. "
        "'postgresql+psycopg2://mlflow:{env:MLFLOW_DB_PASSWORD}@db/mlflow' (it is masked wherever the URI is recorded)",
    )
    artifact_location: str | None = Field("{workspace}/storage/mlartifacts", description="For new experiments.")
    experiment_name: str = "dfkd"
    registered_model_name: str = "dfkd-student"


class ServingConfig(SettingsModel):
    """The input contract every new version is registered with (its MLmodel model_config): the
    served model refuses, before any allocation that grows with the input, a batch or an image side
    outside these bounds (HTTP 400). Versions logged without one use registry_model.DEFAULT_CONTRACT."""

    max_batch: int = Field(32, gt=0, description="most images per request")
    min_side: int = Field(8, gt=0, description="smallest image height/width in pixels")
    max_side: int = Field(1024, gt=0, description="largest image height/width in pixels")

    @model_validator(mode="after")
    def _sides(self) -> "ServingConfig":
        if self.min_side > self.max_side:
            raise ValueError(f"serving.min_side ({self.min_side}) is above serving.max_side ({self.max_side})")
        return self


class DvcConfig(SettingsModel):
    remote_name: str = "storage"
    remote_url: str = Field("{workspace}/storage/dvc-remote", description="Local dir or S3-compatible URL.")


class DfkdConfig(SettingsModel):
    """Root of the settings tree. Paths are relative to the current directory unless absolute."""

    classes: list[str] = Field(min_length=2)
    workspace: Path = Field(Path("."), description="DVC repository root; data/ and storage/ live under it.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; auto/cuda take a free GPU on a multi-GPU host")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast on CUDA (VQ distances, losses, optimizer state stay fp32), fp32 on CPU;"
        " bf16 = bf16 autocast also on a CPU with native bf16 (AVX512-BF16 / AMX)",
    )
    steps_per_gpu: int = Field(1, gt=0, description="how many concurrent GPU steps may share one GPU")
    teacher: TeacherConfig = TeacherConfig()
    generator: GeneratorConfig
    prompts: PromptsConfig = PromptsConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    fewshot: FewShotConfig = FewShotConfig()
    promotion: PromotionConfig = PromotionConfig()
    checks: ChecksConfig = ChecksConfig()
    operations: OperationsConfig = OperationsConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    mlflow: MlflowConfig = MlflowConfig()
    serving: ServingConfig = ServingConfig()
    dvc: DvcConfig = DvcConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        out, seen = [], {}
        for name in v:
            clean = clean_class_name(name)
            if clean.casefold() in RESERVED_CLASS_NAMES:
                raise ValueError(f"class name {name!r} is reserved: {list(RESERVED_CLASS_NAMES)} are the served model's output columns")
            key = class_key(clean)
            if key in seen:
                raise ValueError(f"class names {seen[key]!r} and {name!r} are duplicates (case/space/punctuation-insensitive)")
            seen[key] = name
            out.append(clean)
        return out

    @model_validator(mode="after")
    def _cross(self) -> "DfkdConfig":
        if self.student.head == "embedding" and self.distill.feature_weight <= 0:
            raise ValueError("student.head: embedding needs distill.feature_weight > 0: the cosine loss to the teacher's image embedding is "
                             "what places the student's output in the teacher's space, where classes added by name are read (try 1.0)")
        d = self.distill
        if d.teacher_views > 0 and (d.adversarial_eps > 0 or not d.augment):
            raise ValueError("distill.teacher_views > 0 needs distill.augment: true and distill.adversarial_eps: 0 (PGD moves the inputs "
                             "with the current student, so they cannot be labelled before training; without augmentation the teacher "
                             "already labels each image once)")
        if self.quantization.qat_epochs > 0 and self.student.head == "embedding":
            raise ValueError("quantization.qat_epochs > 0 needs student.head: logits: the fine-tune simulates int8 on the student's "
                             "backbone, and an embedding student's projection and text head lie outside it (set qat_epochs: 0)")
        if self.synthesis.student_weight > 0 and not self.operations.images_per_round:
            raise ValueError(f"synthesis.student_weight ({self.synthesis.student_weight}) acts only in retraining rounds (round 0 has no "
                             "student to compete with): set operations.images_per_round, or synthesis.student_weight: 0")
        cap = self.operations.max_images_per_class
        if cap is not None and self.synthesis.images_per_class > cap:
            raise ValueError(f"operations.max_images_per_class ({cap}) is below synthesis.images_per_class "
                             f"({self.synthesis.images_per_class}), the first round alone")
        for ds in self.evaluation.datasets:
            unknown = set(ds.class_map.values()) - set(self.classes)
            if unknown:
                raise ValueError(f"evaluation.datasets[{ds.name}].class_map maps to unknown classes {sorted(unknown)}")
        return self

    # ---- derived locations (one place, so assets never build paths by hand) ----
    @property
    def data_dir(self) -> Path:
        return self.workspace / "data"

    @property
    def storage_dir(self) -> Path:
        return self.workspace / "storage"

    @property
    def work_dir(self) -> Path:
        """Resumable intermediate state (batches, checkpoints); never versioned."""
        return self.data_dir / ".work"

    @property
    def synthetic_dir(self) -> Path:
        return self.data_dir / "synthetic"

    def class_dir(self, class_name: str) -> Path:
        return self.synthetic_dir / class_key(class_name)

    def path(self, name: str) -> Path:
        """Directory of a non-partitioned asset's files: teacher_head, prompt_bank, student, reports."""
        return self.data_dir / name

    def resolve(self, template: str) -> str:
        """`{workspace}` -> the workspace path; `{env:NAME}` -> $NAME, so a password reaches a store
        URL from the environment and the settings file (hashed, logged as params) never holds it."""

        def env(m: re.Match) -> str:
            if m[1] not in os.environ:
                raise ConfigError(f"environment variable {m[1]} is not set (the settings use {{env:{m[1]}}} in {template!r})")
            return os.environ[m[1]]

        return _ENV_REF.sub(env, template.replace("{workspace}", str(self.workspace.resolve())))

    def class_for_key(self, key: str) -> str:
        for c in self.classes:
            if class_key(c) == key:
                return c
        raise KeyError(f"partition key {key!r} matches no class in `classes` {self.classes}")

    def public_dump(self) -> dict:
        """The settings as JSON-able data with URL passwords masked: what may be logged, hashed,
        stored as MLflow params or written next to the data (the secret is not a setting of the run)."""
        return _redact_strings(self.model_dump(mode="json"))

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.public_dump(), sort_keys=True).encode()).hexdigest()[:16]


_ENV_REF = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _redact_strings(obj):
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redact_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_strings(v) for v in obj]
    return obj


class ConfigError(ValueError):
    """A settings problem, phrased with the file and the dotted key to fix."""


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key (not a setting)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def validate(model: type[BaseModel], raw: dict, source: str):
    """Validate `raw` against `model`; errors become one ConfigError naming `source` and each dotted key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_path_from_env() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DfkdConfig:
    """Read YAML `path` (default: $DFKD_CONFIG or configs/demo.yaml), deep-merge `overrides`, validate."""
    path = Path(path) if path else config_path_from_env()
    if not path.is_file():
        raise ConfigError(f"settings file {path} not found (set {CONFIG_ENV} or pass a path)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"settings file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"settings file {path} must hold a mapping at the top level")
    merged = deep_merge(raw, overrides or {})
    source = str(path) + (" (+ run overrides)" if overrides else "")
    return validate(DfkdConfig, merged, source)
