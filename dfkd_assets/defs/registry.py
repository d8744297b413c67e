"""The MLflow model registry as this pipeline uses it: the one module that owns its aliases and
tag names (docs/ARCHITECTURE.md).

- `challenger`: the newest trained version (student_model).
- `evaluated_<promotion.metric>`: set on a version by evaluation_report after everything else of
  its evaluation is recorded; only such a version may become champion (promotion or rollback).
- `champion`: what consumers load (`models:/<name>@champion`); moved by champion_student through
  the pure rule in core/promotion.py, or by the rollback_champion job. Each move records
  `previous_champion`, `promoted_at`, `promotion_reason` (or `rolled_back_from`, `rolled_back_at`)
  on the version and appends to the registered model's `champion_history` tag.
- What a version is: a pyfunc "model from code" (dfkd_assets/registry_model.py) whose weights are
  safetensors and whose architecture is plain JSON (an embedding student adds its classifier as
  data, head.safetensors); `weights_sha256`, `spec_sha256` (`head_sha256`) and
  `code_sha256` tags record its files, and `load_student_model` refuses a version whose files no
  longer match them, or one logged in the old pickle format (MLflow's `pytorch` flavor).
- `weights_from`: on a version made by adding classes by name (the `student_head` asset, `dfkd
  add-classes`), the version whose weights it reuses unchanged; its head is new, and it is
  evaluated and promoted like any challenger.
- Model card: the version's description (lineage, reproduce command, per-domain accuracy).
- ONNX: `<name>-onnx` versions, tagged `source_model_uri`/`source_run_id`; the student version
  they were exported from carries `onnx_model_uri`.
- int8: `<name>-onnx-int8` versions (champion_int8: the ONNX export quantized, calibrated on the
  synthetic shards only), the same pyfunc code model with the int8 graph as its network, tagged
  `source_model_uri`, `source_onnx_model_uri`, `source_run_id`, `calibration_dvc_hash` (the DVC
  version of the shards it was calibrated on), `onnx_sha256`/`spec_sha256`/`code_sha256`; the student
  version and the `<name>-onnx` version it came from carry `int8_model_uri`. Its description is its
  model card: per-domain top-1 of fp32 and int8 and the file sizes.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from dfkd_assets.config import DfkdConfig

if TYPE_CHECKING:  # this module is imported by `dfkd predict`, which needs no Dagster
    from dfkd_assets.defs.resources import MlflowTracking

CHAMPION, CHALLENGER = "champion", "challenger"
PREVIOUS_CHAMPION, PROMOTED_AT, PROMOTION_REASON = "previous_champion", "promoted_at", "promotion_reason"
ROLLED_BACK_FROM, ROLLED_BACK_AT = "rolled_back_from", "rolled_back_at"
HISTORY = "champion_history"
HISTORY_MAX_CHARS = 5000  # MLflow's tag value limit is larger; the oldest entries are dropped first
CODE_SHA256 = "code_sha256"  # the weights/spec tags are named by registry_model.SHA256 (the same keys as in MLmodel)
PROMPT_METHOD = "prompt_method"
WEIGHTS_FROM = "weights_from"
BASE_LINEAGE = ("teacher_id", "dvc_hash", "fingerprint", PROMPT_METHOD)  # what a re-headed version inherits from its base: what made its weights
# what a version was trained on, with rounds (docs/ARCHITECTURE.md): the newest round in its snapshot, all of
# them, the images per class, and the champion version it was warm-started from (absent: from init)
DATA_ROUND, DATA_ROUNDS, TRAIN_IMAGES_PER_CLASS, WARM_START_FROM = "data_round", "data_rounds", "train_images_per_class", "warm_start_from"
ONNX_MODEL_URI, SOURCE_MODEL_URI, SOURCE_RUN_ID, ONNX_MAX_ABS_DIFF = "onnx_model_uri", "source_model_uri", "source_run_id", "max_abs_diff_vs_pytorch"
ONNX_SUFFIX = "-onnx"
INT8_SUFFIX = "-onnx-int8"
INT8_MODEL_URI, SOURCE_ONNX_MODEL_URI, CALIBRATION_DVC_HASH = "int8_model_uri", "source_onnx_model_uri", "calibration_dvc_hash"
MODEL_NAME_IN_RUN = "student"
DESCRIPTION_MAX_CHARS = 5000  # MLflow's model version description limit
# what the served model's environment installs, each pinned to the version installed here (`pinned`); its own
# code (registry_model.py and dfkd_assets/core, which imports nothing else of the project) travels with the
# model as code_paths, so no requirement names this project: an index could serve anything under that name
SERVING_PACKAGES = ("torch", "torchvision", "timm", "safetensors", "pandas", "numpy")
ONNX_PACKAGES = ("onnx", "onnxruntime", "numpy")
INT8_PACKAGES = (*SERVING_PACKAGES, "onnxruntime")  # the code model (torch resizes) with ONNX Runtime as its network
EXAMPLE_MAX_SIDE = 64  # the input example's side (the model resizes any size; a 224 px example is 3 MB of JSON)
INPUT_CONTRACT = "input_contract"  # version tag and MLmodel metadata key: the served model's input limits (registry_model.py)


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`name==version` of each installed package (pyproject.toml pins them at install time)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def model_code(into: Path) -> Path:
    """A copy of the package's standalone part (`dfkd_assets/__init__.py` + `core/`, sources only) under
    `into`/dfkd_assets: what the registered model imports when served, logged as its code_paths."""
    import shutil

    import dfkd_assets

    src = Path(dfkd_assets.__file__).parent
    dest = Path(into) / "dfkd_assets"
    shutil.copytree(src / "core", dest / "core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(src / "__init__.py", dest / "__init__.py")
    return dest


def serving_contract(cfg: DfkdConfig) -> dict[str, int]:
    """The input limits a new version is logged with (into its MLmodel model_config, which is what the
    served model enforces): `serving.max_batch/min_side/max_side` of the settings."""
    from dfkd_assets import registry_model as rm

    return rm.input_contract(cfg.serving.model_dump())


def data_round_tags(rounds: list[int], images_per_class: int) -> dict[str, str]:
    """The version tags naming the rounds of its training set (with `dvc_hash`, its DVC version)."""
    return {DATA_ROUND: str(max(rounds)), DATA_ROUNDS: ",".join(map(str, rounds)), TRAIN_IMAGES_PER_CLASS: str(images_per_class)}


def champion_uri(cfg: DfkdConfig) -> str:
    """What consumers load: `models:/<name>@champion`."""
    return f"models:/{cfg.mlflow.registered_model_name}@{CHAMPION}"


def rerun_hint(name: str) -> str:
    return (f"re-register it by training again: run the `distill_evaluate_promote` job (or `dfkd run --config <settings>`) "
            f"with mlflow.registered_model_name {name!r}")


class RegistryError(RuntimeError):
    """A registry operation that must not happen (no such version, never evaluated, nothing to roll back)."""


class WrongWeights(RuntimeError):
    """The weights on disk are not the registered version's (the message names both sha256)."""


class LegacyModelError(RegistryError):
    """A version logged in the old pickle format (MLflow `pytorch` flavor): refused, never unpickled."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelRegistry:
    """`cfg.mlflow.registered_model_name` in the registry of `tracking`."""

    def __init__(self, cfg: DfkdConfig, tracking: "MlflowTracking"):
        self.cfg, self.tracking, self.name = cfg, tracking, cfg.mlflow.registered_model_name
        self.evaluated_tag = f"evaluated_{cfg.promotion.metric}"

    @property
    def client(self):
        return self.tracking.client(self.cfg)

    def champion(self) -> str | None:
        return self.tracking.alias_version(self.cfg, CHAMPION)

    def model_uri(self, version: str | None = None) -> str:
        return f"models:/{self.name}/{version}" if version else champion_uri(self.cfg)

    def _log_code_model(self, registered_name: str, name_in_run: str, files: dict[str, Path], classes: list[str], input_size: int,
                        packages: tuple[str, ...]) -> tuple[str, dict[str, str], dict[str, int]]:
        """`files` (registry_model's artifact keys -> paths) logged in the active MLflow run as a new version
        of `registered_name`: the pyfunc code model (registry_model.py, with dfkd_assets/core as its code),
        the input contract of the settings in its MLmodel, `packages` pinned. Returns (version, the sha256
        of its files and code, the contract)."""
        import mlflow.pyfunc

        from dfkd_assets import registry_model as rm
        from dfkd_assets.core.io import sha256_file

        code = Path(rm.__file__)
        sha = {rm.SHA256[k]: sha256_file(p) for k, p in files.items()}
        limits = serving_contract(self.cfg)  # enforced by the served model from its own MLmodel
        with tempfile.TemporaryDirectory() as tmp:
            info = mlflow.pyfunc.log_model(
                name=name_in_run, python_model=str(code), artifacts={k: str(p) for k, p in files.items()}, model_config={**sha, **limits},
                signature=_signature(classes), input_example=_input_example(input_size, limits), pip_requirements=pinned(packages),
                code_paths=[str(model_code(Path(tmp)))], registered_model_name=registered_name,
                metadata={INPUT_CONTRACT: {**limits, "dtype": "float32", "range": [0, 1], "text": rm.describe_contract(limits)}},
            )
        # the version from log_model's answer, never "the highest version"
        return str(info.registered_model_version), {**sha, CODE_SHA256: sha256_file(code)}, limits

    def register_challenger(self, student, tags: dict[str, str]) -> str:
        """Log `student` (core/student.StudentClassifier) in the active MLflow run as a new pickle-free
        version (registry_model.py) with `tags` and its files' sha256; alias `challenger` -> it."""
        from dfkd_assets import registry_model as rm
        from dfkd_assets.core.student import HEAD, META, WEIGHTS

        rm.output_columns(student.classes)  # a class named like an output column is refused before anything is logged
        with tempfile.TemporaryDirectory() as tmp:
            student.save(Path(tmp))
            files = {rm.WEIGHTS: Path(tmp) / WEIGHTS, rm.SPEC: Path(tmp) / META}
            if (Path(tmp) / HEAD).is_file():  # an embedding student's classifier, as data
                files[rm.HEAD] = Path(tmp) / HEAD
            version, integrity, limits = self._log_code_model(self.name, MODEL_NAME_IN_RUN, files, student.classes, student.input_size,
                                                              SERVING_PACKAGES)
        client = self.client
        for key, value in {**tags, **integrity, INPUT_CONTRACT: json.dumps(limits, sort_keys=True)}.items():
            client.set_model_version_tag(self.name, version, key, value)
        client.set_registered_model_alias(self.name, CHALLENGER, version)
        self.write_card(version)
        return version

    def version_or_champion(self, version: str = "") -> str:
        """`version` ('3' or 'v3'), or the champion's when empty; RegistryError when there is none."""
        version = version.strip().lstrip("v") or self.champion()
        if not version:
            raise RegistryError(f"model {self.name} has no champion: name the version to start from")
        return version

    def reheaded_tags(self, base_version: str) -> dict[str, str]:
        """Tags of a version that reuses `base_version`'s weights with a new head: the base's tags that say
        how those weights were made (teacher, data, fingerprint, prompts) and `weights_from`."""
        t = self.client.get_model_version(self.name, base_version).tags
        return {**{k: t[k] for k in BASE_LINEAGE if k in t}, WEIGHTS_FROM: base_version}

    def load(self, version: str, device="cpu"):
        """The student network of `version`, verified (load_student_model), on `device`."""
        return load_student_model(self.client, self.model_uri(version)).to(device)

    def run_id(self, version: str) -> str:
        return self.client.get_model_version(self.name, version).run_id

    def log_evaluation(self, run_id: str, metrics: dict[str, float], reports_dir) -> None:
        """Scores as metrics of the version's run (non-finite ones left out), the report folder as artifacts."""
        import math

        client = self.client
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, key, value)
        client.log_artifacts(run_id, str(reports_dir), "evaluation")

    def write_card(self, version: str, per_domain_md: str | None = None) -> str:
        """The version's description: lineage from its tags, the command that reproduces it and, once
        evaluated, `per_domain_md` (accuracy per domain of student and teacher); returns the text."""
        from dfkd_assets.redaction import redact

        client = self.client
        mv = client.get_model_version(self.name, version)
        t = mv.tags
        store = redact(self.tracking.uri(self.cfg))
        lines = [
            f"# {self.name} v{version}", "",
            f"- teacher: `{t.get('teacher_id', '?')}`",
            f"- data (DVC): `{t.get('dvc_hash', '?')}` (data/synthetic.dvc; `dvc pull` restores it from the DVC remote)",
            f"- prompts: `{t.get(PROMPT_METHOD, '?')}`",
            f"- config hash: `{t.get('config_hash', '?')}`, code: git `{t.get('git_sha', '?')}`",
            f"- MLflow run `{mv.run_id}`, Dagster run `{t.get('dagster_run_id', '?')}`",
            *([f"- weights: those of v{t[WEIGHTS_FROM]} unchanged; classes added by name (a new zero-shot head, no distillation)"]
              if WEIGHTS_FROM in t else []),
            f"- input: {_contract_text(t)} (resized and normalised in the model); "
            "output: `label`, `score` and one probability column per class", "",
            "Reproduce (the run's own settings file, then the pipeline):", "",
            "```bash",
            f"git checkout {t.get('git_sha', '<git sha>').removesuffix('-dirty')}",
            f"MLFLOW_TRACKING_URI='{store}' mlflow artifacts download --run-id {mv.run_id} --artifact-path config.yaml --dst-path .",
            "dfkd run --config config.yaml",
            "```", "",
            "## Accuracy per domain (top-1)", "",
            per_domain_md or "not evaluated yet (evaluation_report writes it here)",
        ]
        text = "\n".join(lines)[:DESCRIPTION_MAX_CHARS]
        client.update_model_version(self.name, version, description=text)
        return text

    @property
    def onnx_name(self) -> str:
        return self.name + ONNX_SUFFIX

    def register_onnx(self, version: str, onnx_file: Path, input_size: int, classes: list[str], max_abs_diff: float) -> str:
        """`onnx_file` (exported from `version`) as a new version of `<name>-onnx`, logged from the run
        that trained `version`; each version names the other in a tag. Returns the ONNX version."""
        import mlflow.onnx
        import numpy as np
        import onnx
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        client, run_id = self.client, self.run_id(version)
        signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 3, input_size, input_size), "images")]),
                                   Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), "logits")]))
        info = mlflow.onnx.log_model(onnx.load(str(onnx_file)), name=MODEL_NAME_IN_RUN + ONNX_SUFFIX, run_id=run_id, signature=signature,
                                     registered_model_name=self.onnx_name, pip_requirements=pinned(ONNX_PACKAGES), save_as_external_data=False,
                                     metadata={"classes": list(classes)})
        onnx_version = str(info.registered_model_version)
        for key, value in {SOURCE_MODEL_URI: self.model_uri(version), SOURCE_RUN_ID: run_id, ONNX_MAX_ABS_DIFF: f"{max_abs_diff:.3g}"}.items():
            client.set_model_version_tag(self.onnx_name, onnx_version, key, value)
        client.set_model_version_tag(self.name, version, ONNX_MODEL_URI, f"models:/{self.onnx_name}/{onnx_version}")
        return onnx_version

    @property
    def int8_name(self) -> str:
        return self.name + INT8_SUFFIX

    def register_int8(self, version: str, onnx_version: str, int8_file: Path, spec: dict, tags: dict[str, str], card: str) -> str:
        """`int8_file` (the export of `version` quantized) as a new version of `<name>-onnx-int8`: this
        package's pyfunc code model (registry_model.py) with the int8 graph and `spec` (student.json)
        as its files, so it answers the pyfunc's requests under the same input contract; logged in
        the run that trained `version`, with `tags`, its files' sha256 and `card` as description.
        Lineage both ways: `version` and the `<name>-onnx` version carry `int8_model_uri`. Returns the version."""
        import mlflow

        from dfkd_assets import registry_model as rm
        from dfkd_assets.core.io import atomic_write_json
        from dfkd_assets.core.student import META

        client, run_id = self.client, self.run_id(version)
        with tempfile.TemporaryDirectory() as tmp:
            atomic_write_json(Path(tmp) / META, spec)
            files = {rm.ONNX: Path(int8_file), rm.SPEC: Path(tmp) / META}
            with mlflow.start_run(run_id=run_id):
                int8_version, integrity, limits = self._log_code_model(self.int8_name, MODEL_NAME_IN_RUN + INT8_SUFFIX, files, spec["classes"],
                                                                       spec["input_size"], INT8_PACKAGES)
        uri = f"models:/{self.int8_name}/{int8_version}"
        lineage = {SOURCE_MODEL_URI: self.model_uri(version), SOURCE_ONNX_MODEL_URI: f"models:/{self.onnx_name}/{onnx_version}", SOURCE_RUN_ID: run_id}
        for key, value in {**tags, **lineage, **integrity, INPUT_CONTRACT: json.dumps(limits, sort_keys=True)}.items():
            client.set_model_version_tag(self.int8_name, int8_version, key, str(value))
        client.update_model_version(self.int8_name, int8_version, description=card[:DESCRIPTION_MAX_CHARS])
        client.set_model_version_tag(self.name, version, INT8_MODEL_URI, uri)
        client.set_model_version_tag(self.onnx_name, onnx_version, INT8_MODEL_URI, uri)
        return int8_version

    def check_files(self, version: str, student_dir: Path) -> None:
        """Refuse (WrongWeights) when the files in `student_dir` are not version `version`'s: their
        sha256 must equal the tags it was registered with. An evaluation scores those files, so it can
        only certify the version whose weights it measured."""
        from dfkd_assets import registry_model as rm
        from dfkd_assets.core.io import sha256_file
        from dfkd_assets.core.student import HEAD, META, WEIGHTS

        tags = self.client.get_model_version(self.name, version).tags
        files = {rm.WEIGHTS: WEIGHTS, rm.SPEC: META, rm.HEAD: HEAD}
        for kind, name in files.items():
            expected, path = tags.get(rm.SHA256[kind]), Path(student_dir) / name
            if expected is None and not path.exists():
                continue  # a logit student has no head
            actual = sha256_file(path) if path.is_file() else None
            if expected is None or actual != expected:
                raise WrongWeights(
                    f"{path} (sha256 {actual}) is not the {name} of {self.name} v{version} (tag {rm.SHA256[kind]}={expected}): another "
                    f"training wrote data/student/ after v{version} was registered, or student_model failed after writing it. "
                    "Re-materialize student_model (or student_head), then evaluation_report")

    def mark_evaluated(self, version: str, score) -> None:
        """Last step of an evaluation: from now on the version may become champion."""
        self.client.set_model_version_tag(self.name, version, self.evaluated_tag, str(score))

    def trained_images_per_class(self, version: str) -> int | None:
        """Images per class of the version's training set (tag `train_images_per_class`); None for a
        version registered before rounds existed."""
        value = self.client.get_model_version(self.name, version).tags.get(TRAIN_IMAGES_PER_CLASS)
        return int(value) if value else None

    def evaluated_score(self, version: str) -> str | None:
        return self.client.get_model_version(self.name, version).tags.get(self.evaluated_tag)

    def promote(self, version: str, previous: str | None, reason: str) -> None:
        client, now = self.client, _now()
        client.set_model_version_tag(self.name, version, PREVIOUS_CHAMPION, str(previous))
        client.set_model_version_tag(self.name, version, PROMOTED_AT, now)
        client.set_model_version_tag(self.name, version, PROMOTION_REASON, reason)
        client.set_registered_model_alias(self.name, CHAMPION, version)
        self._append_history(f"v{version}@{now}")

    def rollback(self, to_version: str = "") -> tuple[str, str]:
        """Move `champion` to `to_version` ('' = the current champion's previous_champion), which must
        have been evaluated; returns (from, to)."""
        from mlflow.exceptions import MlflowException

        current = self.champion()
        if current is None:
            raise RegistryError(f"model {self.name} has no champion to roll back")
        client = self.client
        target = to_version.lstrip("v") or client.get_model_version(self.name, current).tags.get(PREVIOUS_CHAMPION, "")
        if target in ("", "None"):
            raise RegistryError(f"champion v{current} has no {PREVIOUS_CHAMPION}; give ops.move_champion_back.config.to_version")
        try:
            version = client.get_model_version(self.name, target)
        except MlflowException as e:
            raise RegistryError(f"model {self.name} has no version {target!r}: {e.message}") from e
        if self.evaluated_tag not in version.tags:
            raise RegistryError(f"v{target} was never evaluated (no {self.evaluated_tag} tag): refusing to make it champion")
        if target != current:
            now = _now()
            client.set_registered_model_alias(self.name, CHAMPION, target)
            client.set_model_version_tag(self.name, target, ROLLED_BACK_FROM, current)
            client.set_model_version_tag(self.name, target, ROLLED_BACK_AT, now)
            self._append_history(f"rollback:v{target}@{now}")
        return current, target

    def history(self) -> list[str]:
        """Champion moves, oldest first: 'v3@<time>' for a promotion, 'rollback:v2@<time>' for a rollback."""
        return self.client.get_registered_model(self.name).tags.get(HISTORY, "").split()

    def _append_history(self, entry: str) -> None:
        text = " ".join([*self.history(), entry])[-HISTORY_MAX_CHARS:]
        self.client.set_registered_model_tag(self.name, HISTORY, text)


def _signature(classes: list[str]):
    """Input: float32 [N, 3, H, W] (any H, W); output: label, score, one probability per class."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    from dfkd_assets import registry_model as rm

    out = [ColSpec("string", rm.LABEL), ColSpec("double", rm.SCORE), *(ColSpec("double", c) for c in classes)]
    return ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]), Schema(out))


def _contract_text(tags: dict) -> str:
    """The input contract of a version for its card, from its `input_contract` tag (none: logged before contracts)."""
    from dfkd_assets import registry_model as rm

    if INPUT_CONTRACT not in tags:
        return "float32 images [N, 3, H, W] in [0, 1], any H x W (logged before input contracts: no limits enforced)"
    return rm.describe_contract(rm.input_contract(json.loads(tags[INPUT_CONTRACT])))


def _input_example(input_size: int, limits: dict[str, int] | None = None):
    import numpy as np

    side = min(int(input_size), EXAMPLE_MAX_SIDE)
    if limits:
        side = min(max(side, limits["min_side"]), limits["max_side"])
    return np.random.default_rng(0).random((1, 3, side, side), dtype=np.float32)


def model_version_of(client, model_uri: str) -> tuple[str, str]:
    """(name, version) behind `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/").strip("/")
    if not model_uri.startswith("models:/") or not ref:
        raise RegistryError(f"{model_uri!r} is not a registry URI: give models:/<name>/<version> or models:/<name>@<alias>")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, version = ref.rsplit("/", 1)
        return name, str(client.get_model_version(name, version).version)
    except (MlflowException, ValueError) as e:
        raise RegistryError(f"{model_uri} is not in the registry: {getattr(e, 'message', e)}") from e


def load_student_model(client, model_uri: str):
    """The student network (core/student.StudentClassifier, CPU, eval mode) behind a registry URI.

    Nothing of the model directory is executed or unpickled: its MLmodel is read as YAML, the
    weights as safetensors and the architecture from student.json, each file checked against the
    sha256 tags recorded at registration (and the copy in MLmodel). A version in the old pickle
    format, or one whose files no longer match, raises with what to do."""
    import mlflow.artifacts

    from dfkd_assets import registry_model as rm

    name, version = model_version_of(client, model_uri)
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        files, code, model_config = _student_files(local, f"{model_uri} ({name} v{version})", name)
        expected = {key: mv.tags.get(key) for key in rm.SHA256.values()}
        missing = [k for k, tag in rm.SHA256.items() if expected[tag] and k not in files]
        if missing:
            raise rm.IntegrityError(f"{name} v{version} was registered with {', '.join(missing)} files its model directory no longer "
                                    "lists (MLmodel changed after logging); refusing to load it")
        rm.verify_sha256(files, expected, f"the registry's tags of {name} v{version}")
        rm.verify_sha256(files, model_config, f"the MLmodel of {name} v{version}")
        _verify_code(code, mv.tags.get(CODE_SHA256), f"{name} v{version}")
        return rm.build_student(files)


def _student_files(local: Path, what: str, name: str) -> tuple[dict[str, Path], Path, dict]:
    """The weights and spec files, the code file and the model_config of a downloaded model directory;
    LegacyModelError for the old pickle format, RegistryError for anything else that is not ours."""
    import yaml

    from dfkd_assets import registry_model as rm

    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    flavors = mlmodel.get("flavors") or {}
    if "pytorch" in flavors or (local / "data" / "model.pth").exists():
        raise LegacyModelError(f"{what} was logged in the old pickle format (MLflow `pytorch` flavor, data/model.pth); "
                               f"it is not loaded, because unpickling runs whatever code the file holds: {rerun_hint(name)}")
    pyfunc = flavors.get("python_function") or {}
    artifacts = pyfunc.get("artifacts") or {}
    if "model_code_path" not in pyfunc or rm.SPEC not in artifacts or not ({rm.WEIGHTS, rm.ONNX} & set(artifacts)):
        raise RegistryError(f"{what} is not a dfkd student (no models-from-code pyfunc with '{rm.SPEC}' and '{rm.WEIGHTS}' (or '{rm.ONNX}', "
                            f"the int8 variant) artifacts): {rerun_hint(name)}")
    files = {k: local / artifacts[k]["path"] for k in (rm.WEIGHTS, rm.SPEC, rm.HEAD, rm.ONNX) if k in artifacts}
    return files, local / Path(pyfunc["model_code_path"]).name, pyfunc.get("config") or {}  # log_model's model_config


def _verify_code(code: Path, expected: str | None, what: str) -> None:
    """The model's code file as registered: dfkd never runs it, but `mlflow models serve` does."""
    from dfkd_assets import registry_model as rm
    from dfkd_assets.core.io import sha256_file

    if not expected or not code.is_file() or sha256_file(code) != expected:
        raise rm.IntegrityError(f"{code.name} ({code}) of {what} does not match the {CODE_SHA256} tag recorded at registration: "
                                "the model's code was changed after logging (mlflow models serve would run it); refusing to load it")
