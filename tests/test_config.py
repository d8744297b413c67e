from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from dfkd_assets import loaders
from dfkd_assets.config import ConfigError, DfkdConfig, load_config
from dfkd_assets.core.names import class_key

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())


@pytest.mark.parametrize("name", ["ci.yaml", "demo.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert len(cfg.classes) >= 2 and cfg.synthesis.image_size % 4 == 0


def test_unknown_key_is_named(tmp_path):
    d = base()
    d["synthesis"]["iteratons"] = 3
    with pytest.raises(ConfigError, match=r"synthesis\.iteratons: unknown key"):
        load_config(write(tmp_path, d))


def test_bad_value_is_named(tmp_path):
    d = base()
    d["synthesis"]["images_per_class"] = 0
    with pytest.raises(ConfigError, match=r"synthesis\.images_per_class"):
        load_config(write(tmp_path, d))
    d = base()
    d["device"] = "tpu"
    with pytest.raises(ConfigError, match=r"device"):
        load_config(write(tmp_path, d))
    d = base()
    d["synthesis"]["student_weight"] = 1.0  # student-aware synthesis without rounds would do nothing
    with pytest.raises(ConfigError, match=r"synthesis\.student_weight \(1\.0\) acts only in retraining rounds.*operations\.images_per_round"):
        load_config(write(tmp_path, d))
    assert load_config(write(tmp_path, d), {"operations": {"images_per_round": 4}}).synthesis.student_weight == 1.0


def test_quantization_aware_fine_tuning_settings_are_checked_when_loaded(tmp_path):
    """A negative epoch count or a zero learning rate is named; QAT on an embedding student (whose projection and
    text head lie outside the simulated backbone) is refused with the two settings named, not at run time."""
    for key, value in (("qat_epochs", -1), ("qat_lr", 0)):
        d = base()
        d["quantization"] = {key: value}
        with pytest.raises(ConfigError, match=rf"quantization\.{key}"):
            load_config(write(tmp_path, d))
    d = base()
    d["quantization"] = {"qat_epochs": 2}
    d["student"] = {"head": "embedding"}
    d["distill"] = {"feature_weight": 1.0}
    with pytest.raises(ConfigError, match=r"quantization\.qat_epochs > 0 needs student\.head: logits"):
        load_config(write(tmp_path, d))


def test_overrides_merge_deeply_and_are_validated(tmp_path):
    p = write(tmp_path, base())
    cfg = load_config(p, {"synthesis": {"iterations": 3}})
    assert cfg.synthesis.iterations == 3 and cfg.synthesis.cutn == base()["synthesis"]["cutn"]
    with pytest.raises(ConfigError, match=r"run overrides.*\n.*distill\.epochs"):
        load_config(p, {"distill": {"epochs": -1}})


def test_missing_file_names_env_var(tmp_path):
    with pytest.raises(ConfigError, match="DFKD_CONFIG"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("classes", [["dog", "Dog "], ["hot dog", "hot_dog"], ["a"], ["dog", ""], ["dog", "ca\x00t"]])
def test_bad_class_lists_rejected(classes):
    d = base()
    d["classes"] = classes
    with pytest.raises(Exception) as e:
        DfkdConfig.model_validate(d)
    assert "classes" in str(e.value)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "狗", "🐶 dog", "x" * 300])
def test_class_key_stays_inside_data_root(tmp_path, name):
    key = class_key(name)
    assert key and "/" not in key and ".." not in key and len(key) <= 64
    assert (tmp_path / key).resolve().parent == tmp_path.resolve()


def test_config_hash_changes_with_settings():
    a = DfkdConfig.model_validate(base())
    d = base()
    d["synthesis"]["lr"] = 0.2
    assert a.config_hash() != DfkdConfig.model_validate(d).config_hash()
    assert a.config_hash() == DfkdConfig.model_validate(base()).config_hash()


def test_toyworld_settings_name_the_bad_key():
    from dfkd_assets.config import validate
    from dfkd_assets.toyworld.config import ToyworldConfig

    with pytest.raises(ConfigError, match=r"clip\.stepz: unknown key"):
        validate(ToyworldConfig, {"clip": {"stepz": 3}}, "toyworld.yaml")
    assert validate(ToyworldConfig, {}, "defaults").settings_hash() == ToyworldConfig().settings_hash()


# --------------------------------------------------------------- one schema per setting

def _another_value(name: str, field, value, tmp_path):
    """A valid value of a setting other than `value` (candidates tried in order by the caller)."""
    from typing import get_args

    from dfkd_assets.config import _leaf_types

    leaves = _leaf_types(field.annotation)
    if bool in leaves:
        return [not value] if value is not None else [True, False]
    if str in leaves and get_args(field.annotation) and all(isinstance(a, str) for a in get_args(field.annotation)):
        return [a for a in get_args(field.annotation) if a != value]
    literal_args = [a for a in get_args(field.annotation) for a in (get_args(a) or (a,)) if isinstance(a, str)]
    if literal_args:
        return [a for a in literal_args if a != value]
    if int in leaves and not isinstance(value, float):
        return [(value or 0) + 1, (value or 0) + 2, 1]
    if float in leaves:
        return [value * 0.5 if value else 0.25, value + 0.1 if value is not None else 0.5, 0.01]
    if str in leaves:
        return ["an {style} style: {}" if "{style}" in value else "a drawing of {}"]
    if list in leaves or tuple in leaves:
        return [[v + 7 for v in value]]
    words = tmp_path / f"{name}.txt"
    words.write_text("watercolour\ncharcoal\n")
    return [words]


@pytest.mark.parametrize("section,mapper", [
    ("synthesis", lambda cfg: loaders.synthesis_settings(cfg, torch.device("cpu"))),
    ("distill", lambda cfg: loaders.distill_settings(cfg, torch.device("cpu"))),
    ("prompts", lambda cfg: loaders.style_settings(cfg)),
    ("fewshot", lambda cfg: loaders.fewshot_settings(cfg)),
    ("quantization", lambda cfg: loaders.quantization_settings(cfg)),
])
def test_every_setting_reaches_core_or_is_orchestration_only(section, mapper, tmp_path):
    """One schema per setting: each field of a mapped section either changes the core settings
    object when it changes (it reaches core/ by name or through a declared derived value) or is
    declared `orchestration_only` in config.py; and every core field is filled (loaders.core_settings
    refuses a core field that is neither a setting nor a derived value)."""
    from dfkd_assets.config import SettingsModel, orchestration_fields

    # rounds on: synthesis.student_weight is valid only with them
    base = {"classes": ["a", "b"], "generator": {"config_file": "unused.yaml"}, "operations": {"images_per_round": 4}}
    model = DfkdConfig.model_fields[section].annotation
    defaults = getattr(DfkdConfig.model_validate(base), section)
    reference = mapper(DfkdConfig.model_validate(base))
    unreached = []
    for name, field in model.model_fields.items():
        if name in orchestration_fields(model):
            continue
        default = getattr(defaults, name)
        changed = None
        for candidate in _another_value(name, field, default, tmp_path):
            try:
                cfg = DfkdConfig.model_validate({**base, section: {name: candidate}})
            except ValidationError:
                continue
            changed = mapper(cfg) != reference
            break
        assert changed is not None, f"{section}.{name}: no other valid value to try (extend _another_value)"
        if not changed:
            unreached.append(name)
    assert not unreached, f"{section}: settings {unreached} reach no core field and are not declared orchestration_only"
    assert issubclass(model, SettingsModel)


def test_core_settings_refuses_a_field_without_a_source():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Odd:
        lr: float
        nowhere: int

    cfg = DfkdConfig.model_validate({"classes": ["a", "b"], "generator": {"config_file": "unused.yaml"}})
    assert loaders.core_settings(Odd, cfg.distill, nowhere=1) == Odd(lr=cfg.distill.lr, nowhere=1)
    with pytest.raises(TypeError, match="nowhere"):
        loaders.core_settings(Odd, cfg.distill)
    with pytest.raises(TypeError, match="shadow"):
        loaders.core_settings(Odd, cfg.distill, lr=0.5, nowhere=1)
