"""Settings -> loaded models and core settings objects: the one mapping from the pydantic tree
(dfkd_assets/config.py, where every setting has its one default) onto core/'s dataclasses, which
have no defaults of their own. Used by the stage functions (dfkd_assets/stages/), the assets and
the benchmarks."""

from __future__ import annotations

import dataclasses

from dfkd_assets.config import DfkdConfig


def core_settings(cls, section, resolved: dict | None = None, **derived):
    """`cls`, a settings dataclass of core/, filled by field name from the config `section` (one
    schema: the field's type, bounds and default live in config.py only); `derived` holds the fields
    that are not settings of the section (bf16 from the device, the style words from their file...);
    `resolved` the settings whose value depends on the machine (channels_last: None = on CUDA).

    A core field that is neither, or a derived value that shadows a setting, is a programming error
    caught on the first call (and by tests/test_config.py's completeness test)."""
    own = type(section).model_fields
    wanted = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING]
    stray = [n for n in wanted if n not in own and n not in derived]
    shadow = [n for n in derived if n in own]
    if stray or shadow:
        raise TypeError(f"{cls.__name__}: fields {stray} are neither {type(section).__name__} settings nor derived values; "
                        f"derived values {shadow} shadow settings")
    values = {n: getattr(section, n) for n in wanted if n in own} | (resolved or {})
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, **derived)


def device_for(cfg: DfkdConfig):
    from dfkd_assets.core.devices import resolve_device

    return resolve_device(cfg.device)


def device_lease(cfg: DfkdConfig):
    """Context manager: the device for one GPU step, a free GPU of its own on a multi-GPU host."""
    from dfkd_assets.core.devices import lease_device

    return lease_device(cfg.device, cfg.storage_dir / "device-locks", cfg.steps_per_gpu)


def teacher_for(cfg: DfkdConfig, device):
    from dfkd_assets.core.teacher import load_teacher

    t = cfg.teacher
    return load_teacher(t.model_name, t.pretrained, t.model_config_file, t.init_seed, device, t.cache_dir)


def fresh_student(cfg: DfkdConfig, classes: list[str] | None = None, embed_dim: int | None = None):
    """A fresh logit student as `student` configures it (arch, width, input size, init seed) for
    `classes` (default `cfg.classes`); `embed_dim` adds the embedding head feature distillation needs.
    Distillation, the few-shot scratch start and the KD benchmark all build it here, so a new
    student setting reaches every one of them."""
    from dfkd_assets.core.student import build_student

    s = cfg.student
    return build_student(s.arch, cfg.classes if classes is None else classes, s.input_size, s.init_seed, embed_dim, s.model_kwargs)


def generator_for(cfg: DfkdConfig, device):
    from dfkd_assets.core.vqgan import load_vqgan

    g = cfg.generator
    return load_vqgan(g.config_file, g.checkpoint, g.init_seed, device)


def synthesis_settings(cfg: DfkdConfig, device):
    from dfkd_assets.core.augment import AugmentSpec
    from dfkd_assets.core.devices import use_bf16
    from dfkd_assets.core.synthesis import SynthesisSettings

    s = cfg.synthesis
    return core_settings(
        SynthesisSettings, s, augment=AugmentSpec(p=s.augment_p, noise_max=s.noise_max), bf16=use_bf16(device, cfg.precision),
        resolved={"channels_last": device.type == "cuda" if s.channels_last is None else s.channels_last},
    )


def distill_settings(cfg: DfkdConfig, device):
    from dfkd_assets.core.devices import use_bf16
    from dfkd_assets.core.distill import DistillSettings

    return core_settings(DistillSettings, cfg.distill, bf16=use_bf16(device, cfg.precision))


def style_settings(cfg: DfkdConfig):
    """Prompt settings -> core StyleSettings, with the style dictionary read from its file."""
    from importlib.resources import files

    from dfkd_assets.core.prompts import StyleSettings

    p = cfg.prompts
    path = p.style_words_file or files("dfkd_assets") / "resources" / "style_words.txt"
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"prompts.style_words_file {path} cannot be read: {e}") from None
    words = tuple(line.split("#", 1)[0].strip() for line in text.splitlines())
    words = tuple(w for w in words if w)
    if p.method == "mix" and not words:
        raise ValueError(f"prompts.style_words_file {path} holds no style words")
    return core_settings(StyleSettings, p, style_words=words)


def eval_sets(cfg: DfkdConfig) -> dict[str, list]:
    """Every configured evaluation dataset: name -> its DomainSets, with the preset's domains and class map applied."""
    from dfkd_assets.core.datasets import PRESETS
    from dfkd_assets.core.evaluation import scan_domainbed

    out = {}
    for ds in cfg.evaluation.datasets:
        preset = PRESETS.get(ds.preset) if ds.preset else None
        domains = ds.domains or (list(preset.domains) if preset else None)
        class_map = {**(preset.folders if preset else {}), **ds.class_map}
        out[ds.name] = scan_domainbed(ds.root, cfg.classes, class_map, domains, cfg.evaluation.max_images_per_class, ds.name, ds.other_classes)
    return out


def fewshot_settings(cfg: DfkdConfig):
    from dfkd_assets.core.fewshot import FewShotSettings

    return core_settings(FewShotSettings, cfg.fewshot, min_crop_scale=cfg.distill.min_crop_scale)


def quantization_settings(cfg: DfkdConfig):
    from dfkd_assets.core.quantize import QuantizationSettings

    return core_settings(QuantizationSettings, cfg.quantization)
