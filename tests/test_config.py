from pathlib import Path

import pytest
import yaml

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
