"""Settings -> loaded models and core settings objects: the one mapping from the pydantic tree
(dfkd_assets/config.py, where every setting has its one default) onto core/'s dataclasses, which
have no defaults of their own. Used by the stage functions (dfkd_assets/stages/), the assets and
the benchmarks."""

from __future__ import annotations

from dfkd_assets.config import DfkdConfig


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
    return SynthesisSettings(
        iterations=s.iterations, lr=s.lr, lr_schedule=s.lr_schedule, cutn=s.cutn, cut_pow=s.cut_pow, image_size=s.image_size,
        noise_start_fraction=s.noise_start_fraction,
        augment=AugmentSpec(p=s.augment_p, noise_max=s.noise_max), bf16=use_bf16(device, cfg.precision),
        channels_last=device.type == "cuda" if s.channels_last is None else s.channels_last, compile=s.compile,
        compile_mode=s.compile_mode,
    )


def distill_settings(cfg: DfkdConfig, device):
    from dfkd_assets.core.devices import use_bf16
    from dfkd_assets.core.distill import DistillSettings

    # broad_images decides the training set (stages/training.broad_images), not the KD loop
    return DistillSettings(**cfg.distill.model_dump(exclude={"broad_images"}), bf16=use_bf16(device, cfg.precision))


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
    return StyleSettings(
        num_styles=p.num_styles, style_template=p.style_template, positive_template=p.positive_template,
        style_words=words, mix_words=p.mix_words, mix_alpha=p.mix_alpha, steps=p.steps, lr=p.lr,
        temperature=p.temperature, orthogonality_weight=p.orthogonality_weight, seed=p.seed,
    )


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

    f = cfg.fewshot
    return FewShotSettings(shots=tuple(f.shots), seeds=tuple(f.seeds), steps=f.steps, lr=f.lr, batch_size=f.batch_size,
                           min_crop_scale=cfg.distill.min_crop_scale)
