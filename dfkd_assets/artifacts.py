"""The files passed between assets: one writer and one reader for each, and no other code builds
their paths (docs/ARCHITECTURE.md).

| artifact              | written by         | read by                                          |
|-----------------------|--------------------|--------------------------------------------------|
| teacher head          | teacher_head       | prompt_bank, synthetic_images, student_model, evaluation_report |
| prompt bank           | prompt_bank        | synthetic_images, the stale_partitions sensor    |
| class shard           | synthetic_images   | synthetic_dataset, its checks, student_model     |
| round shard (r >= 1)  | synthetic_round_images | synthetic_dataset, its checks, student_model |
| snapshot (DVC file)   | synthetic_dataset  | student_model                                    |
| student + its record  | student_model, student_head | evaluation_report, few_shot_report, its check |
| evaluation metrics    | evaluation_report  | champion_student, its check                      |
| ONNX export           | champion_onnx      | champion_int8                                    |
| int8 export           | champion_int8      | (the registry: `<name>-onnx-int8`)               |

Every write is atomic (core/io.py), so a reader sees the previous version or the new one, never
half of one. Imports torch only inside functions: the sensor imports this module at tick time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from dfkd_assets.config import DfkdConfig
from dfkd_assets.core.names import class_key

TEACHER_HEAD, PROMPT_BANK, STUDENT, REPORTS, PREVIEWS, EXPORT = "teacher_head", "prompt_bank", "student", "reports", "previews", "export"


# ---- teacher head -------------------------------------------------------------------------------

def write_teacher_head(cfg: DfkdConfig, head, teacher_id: str) -> Path:
    from safetensors.torch import save

    from dfkd_assets.core.io import atomic_write_bytes, atomic_write_json

    out = cfg.path(TEACHER_HEAD)
    atomic_write_bytes(out / "head.safetensors", save({"head": head.contiguous().cpu()}))
    atomic_write_json(out / "head.json", {"teacher_id": teacher_id, "classes": cfg.classes, "templates": cfg.teacher.templates})
    return out


class TeacherHeadMismatch(RuntimeError):
    """The stored teacher head was built for another teacher or class list."""


def read_teacher_head(cfg: DfkdConfig, teacher, device):
    """The zero-shot head, refused (TeacherHeadMismatch) if another teacher or class list made it."""
    from safetensors.torch import load_file

    d = cfg.path(TEACHER_HEAD)
    if not (d / "head.json").is_file():
        raise FileNotFoundError(f"teacher head not found in {d}: materialize teacher_head first")
    meta = json.loads((d / "head.json").read_text())
    if meta["teacher_id"] != teacher.teacher_id or meta["classes"] != cfg.classes:
        raise TeacherHeadMismatch(
            f"{d} was built for teacher {meta['teacher_id']!r} and classes {meta['classes']}, "
            f"not {teacher.teacher_id!r} and {cfg.classes}: re-materialize teacher_head"
        )
    return load_file(d / "head.safetensors")["head"].to(device)


# ---- prompt bank --------------------------------------------------------------------------------

def prompt_bank_dir(cfg: DfkdConfig) -> Path:
    return cfg.path(PROMPT_BANK)


BANK_INPUTS = "inputs.json"  # the prompt settings and style-words content the bank was made from (fingerprints.bank_inputs_hash)


def write_prompt_bank(cfg: DfkdConfig, bank, curves: list[list[float]]) -> Path:
    """The bank (its diagnostics included), diagnostics.json with the contrastive loss curves, and
    inputs.json: the hash of the prompt settings and style-words bytes it was made from."""
    from dfkd_assets.core.io import atomic_write_json
    from dfkd_assets.fingerprints import bank_inputs_hash

    out = prompt_bank_dir(cfg)
    bank.save(out)
    atomic_write_json(out / "diagnostics.json", {**bank.diagnostics, "loss_curves": curves})
    atomic_write_json(out / BANK_INPUTS, {"inputs_hash": bank_inputs_hash(cfg)})
    return out


def check_prompt_bank_inputs(cfg: DfkdConfig) -> None:
    """PromptBankMismatch when the bank was made from other prompt settings or another style-words file
    (same path, new bytes included) than the current ones: new images must not come from a stale bank
    under a fingerprint that claims the current inputs. A bank written before inputs.json existed passes."""
    from dfkd_assets.core.prompts import PromptBankMismatch
    from dfkd_assets.fingerprints import bank_inputs_hash

    path = prompt_bank_dir(cfg) / BANK_INPUTS
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text()).get("inputs_hash")
    except (ValueError, AttributeError):
        recorded = None
    if recorded != bank_inputs_hash(cfg):
        raise PromptBankMismatch(f"the prompt bank in {prompt_bank_dir(cfg)} was made from other prompt settings or another "
                                 "style-words file (its content changed since): re-materialize prompt_bank")


def read_prompt_bank(cfg: DfkdConfig):
    from dfkd_assets.core.prompts import PromptBank

    return PromptBank.load(prompt_bank_dir(cfg))


# ---- class shards -------------------------------------------------------------------------------

ROUND_PREFIX = "round_"


def student_lock(cfg: DfkdConfig) -> Path:
    """Lock file held by everything that writes or scores data/student/ (its weights, record and the
    distillation checkpoint): a training, a re-heading (add-classes) and an evaluation. Two trainings
    in one workspace (a `gpu` pool above one, add-classes while a run trains) take turns, and an
    evaluation never scores weights that change under it."""
    return cfg.work_dir / "locks" / "student.lock"


def class_lock(cfg: DfkdConfig, class_name: str) -> Path:
    """Lock file held while any round of a class is synthesized (one writer per class at a time:
    two runs asking for the same round wait for each other and the second reuses the shard)."""
    return _key_lock(cfg, class_key(class_name))


def _key_lock(cfg: DfkdConfig, key: str) -> Path:
    return cfg.work_dir / "synthetic" / f"{key}.lock"


def round_dir(cfg: DfkdConfig, class_name: str, round_: int = 0) -> Path:
    """Where round `round_` of a class lives: round 0 is the class folder itself (as before rounds
    existed), round r >= 1 a `round_NNN` folder inside it, so `dvc add data/synthetic` versions all."""
    return cfg.class_dir(class_name) if round_ == 0 else cfg.class_dir(class_name) / f"{ROUND_PREFIX}{round_:03d}"


def class_work_dir(cfg: DfkdConfig, class_name: str, round_: int = 0) -> Path:
    """Finished batches of an unfinished shard (resumable synthesis); removed once the shard is written."""
    key = class_key(class_name)
    return cfg.work_dir / "synthetic" / (key if round_ == 0 else f"{key}.{ROUND_PREFIX}{round_:03d}")


def class_rounds(cfg: DfkdConfig, class_name: str) -> list[int]:
    """The rounds >= 1 of a class whose manifest exists (a round's manifest is written last, so a
    round killed mid-synthesis is not listed), ascending."""
    from dfkd_assets.core.io import MANIFEST_NAME

    d = cfg.class_dir(class_name)
    found = []
    for sub in d.glob(f"{ROUND_PREFIX}*") if d.is_dir() else ():
        suffix = sub.name[len(ROUND_PREFIX):]
        if suffix.isdigit() and int(suffix) > 0 and (sub / MANIFEST_NAME).is_file():
            found.append(int(suffix))
    return sorted(found)


def common_rounds(cfg: DfkdConfig) -> list[int]:
    """Rounds every configured class has: 0 and the rounds >= 1 present for all classes. A round
    only some classes have (being synthesized, or a class added since) stays out of training."""
    sets = [set(class_rounds(cfg, c)) for c in cfg.classes]
    return [0, *sorted(set.intersection(*sets))] if sets else [0]


def class_preview(cfg: DfkdConfig, class_name: str) -> Path:
    return cfg.path(PREVIEWS) / f"{class_key(class_name)}.png"


def remove_partial_writes(cfg: DfkdConfig, class_name: str, round_: int = 0) -> None:
    """Temp files of a run killed while writing this class (atomic writes only rename complete files).
    Call under the class lock; `dvc add` would otherwise version them."""
    for stale in round_dir(cfg, class_name, round_).glob(".*.tmp"):
        stale.unlink()


def current_shard(cfg: DfkdConfig, class_name: str, fingerprint: str, round_: int = 0) -> dict | None:
    """The manifest of a class's round when its shard exists and was made with `fingerprint`, else None."""
    from dfkd_assets.core.io import ShardError, read_manifest

    d = round_dir(cfg, class_name, round_)
    try:
        manifest = read_manifest(d)
    except (ShardError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint or not (d / manifest["shard"]).is_file():
        return None
    return manifest


def write_class_shard(cfg: DfkdConfig, class_name: str, images, records: list[dict], meta: dict, round_: int = 0) -> dict:
    """PNG files named <class key>_<index>.png (round r >= 1: <class key>_rNNN_<index>.png, so names
    stay unique over the union) in one tar, then the manifest; returns the manifest."""
    from dfkd_assets.core.io import encode_png, write_shard

    key = class_key(class_name) + (f"_r{round_:03d}" if round_ else "")
    items = [(f"{key}_{i:06d}.png", encode_png(im)) for i, im in enumerate(images)]
    return write_shard(round_dir(cfg, class_name, round_), items, records, meta={"class": class_name, **({"round": round_} if round_ else {}), **meta})


def read_class_manifest(cfg: DfkdConfig, class_name: str, round_: int = 0) -> dict:
    """The manifest, checked for shape (ShardError naming the file otherwise)."""
    from dfkd_assets.core.io import read_manifest

    return read_manifest(round_dir(cfg, class_name, round_))


def verify_class_shard(cfg: DfkdConfig, class_name: str, round_: int = 0) -> dict:
    """The manifest, after checking the whole tar against its recorded sha256 (cheap: no decoding)."""
    from dfkd_assets.core.io import ShardError, sha256_file

    d = round_dir(cfg, class_name, round_)
    m = read_class_manifest(cfg, class_name, round_)
    if sha256_file(d / m["shard"]) != m["shard_sha256"]:
        raise ShardError(f"{d / m['shard']} does not match the sha256 in its manifest")
    return m


def snapshot_shard_dirs(cfg: DfkdConfig, rounds: list[int]) -> list[Path]:
    """The shard folders of every configured class's `rounds` (a snapshot's index.json names them),
    class by class: what training reads, and the only images int8 calibration reads."""
    return [round_dir(cfg, c, r) for c in cfg.classes for r in rounds]


def read_class_images(cfg: DfkdConfig, class_name: str, rounds: tuple[int, ...] | list[int] = (0,)):
    """uint8 [N,H,W,3] of the given rounds of a class, concatenated in round order, every image
    checked against its sha256 in its manifest."""
    import numpy as np

    from dfkd_assets.core.io import read_shard

    return np.concatenate([read_shard(round_dir(cfg, class_name, r), verify=True)[0] for r in rounds])


def images_in_rounds(cfg: DfkdConfig, class_name: str, rounds: list[int]) -> int:
    """A class's image count over `rounds`, from their manifests (ShardError when one is missing)."""
    return sum(read_class_manifest(cfg, class_name, r)["count"] for r in rounds)


def images_before_round(cfg: DfkdConfig, class_name: str, round_: int) -> int:
    """A class's images in the rounds before `round_`: the counts of the shards that exist, and
    for an earlier round not made yet, the size it will have (round 0: synthesis.images_per_class,
    later: operations.images_per_round). What the cap is checked against."""
    from dfkd_assets.core.io import ShardError

    total = 0
    for r in range(round_):
        try:
            total += read_class_manifest(cfg, class_name, r)["count"]
        except ShardError:
            total += cfg.synthesis.images_per_class if r == 0 else (cfg.operations.images_per_round or 0)
    return total


def drop_round(cfg: DfkdConfig, round_: int) -> list[Path]:
    """Delete round `round_` >= 1 of every class folder that has it (the explicit command behind
    `dfkd rounds drop`; no setting ever deletes a round). Takes each class's lock. Returns what went."""
    import shutil

    from dfkd_assets.core.io import exclusive_lock

    if round_ < 1:
        raise ValueError("round 0 is the synthetic_images partition of each class, not a round to drop")
    gone = []
    for d in sorted(cfg.synthetic_dir.glob(f"*/{ROUND_PREFIX}{round_:03d}")) if cfg.synthetic_dir.is_dir() else ():
        with exclusive_lock(_key_lock(cfg, d.parent.name)):
            shutil.rmtree(d)
            shutil.rmtree(cfg.work_dir / "synthetic" / f"{d.parent.name}.{d.name}", ignore_errors=True)
        gone.append(d)
    return gone


# ---- snapshot -----------------------------------------------------------------------------------

def write_snapshot_index(cfg: DfkdConfig, counts: dict[str, int], rounds: list[int] | None = None) -> Path:
    """Which classes and rounds a snapshot is for (the folder may hold classes dropped from the
    config since, or a round not every class has yet): what training reads, and what a restored
    version says it held."""
    from dfkd_assets.core.io import atomic_write_json

    atomic_write_json(cfg.synthetic_dir / "index.json", {"classes": cfg.classes, "counts": counts, "rounds": rounds or [0]})
    return cfg.synthetic_dir


def read_snapshot_index(cfg: DfkdConfig, directory: Path | None = None) -> dict:
    """index.json of the snapshot in data/synthetic (or a restored copy in `directory`); a snapshot
    written before rounds existed holds round 0 only."""
    path = Path(directory or cfg.synthetic_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialize synthetic_dataset first")
    index = json.loads(path.read_text())
    return {**index, "rounds": index.get("rounds", [0])}


def snapshot_dvc_file(cfg: DfkdConfig) -> Path:
    return cfg.synthetic_dir.with_name(cfg.synthetic_dir.name + ".dvc")


def read_snapshot_hash(cfg: DfkdConfig) -> str:
    """The DVC hash of the last `dvc add` of data/synthetic (what the student's lineage names)."""
    path = snapshot_dvc_file(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialize synthetic_dataset first")
    return dvc_file_hash(path)


class StaleSnapshot(RuntimeError):
    """The class shards a training read are not the ones in the DVC snapshot it would be recorded with."""


def check_snapshot(cfg: DfkdConfig, snapshot: dict[str, str], rounds: list[int], dvc_hash: str) -> None:
    """Every shard manifest of `rounds` (each image is checked against its manifest when read) is
    byte-identical to the one in the snapshot (`snapshot`: relpath -> md5, DvcRepo.snapshot_files),
    so the version's `dvc_hash` names the data it was trained on. A class partition re-materialised
    after synthetic_dataset fails here, naming it."""
    import hashlib

    from dfkd_assets.core.io import MANIFEST_NAME

    stale = []
    for c in cfg.classes:
        for r in rounds:
            path = round_dir(cfg, c, r) / MANIFEST_NAME
            rel = path.relative_to(cfg.synthetic_dir).as_posix()
            try:
                md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            except OSError:
                md5 = None
            if snapshot.get(rel) != md5:
                stale.append(f"{c} (round {r}: {rel})")
    if stale:
        raise StaleSnapshot(f"the class shards of {', '.join(stale)} in {cfg.synthetic_dir} are not those of the DVC snapshot {dvc_hash} "
                            "(re-materialized after it?): materialize synthetic_dataset, then student_model")


def dvc_file_hash(path: Path) -> str:
    """The hash of the one output a `.dvc` file tracks."""
    out = yaml.safe_load(Path(path).read_text())["outs"][0]
    return out.get("md5") or out.get("hash") or ""


# ---- student ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudentRecord:
    """Which registered model version data/student/ holds, and what it was trained on."""

    model_name: str
    version: str
    run_id: str
    dvc_hash: str
    fingerprint: str


def student_dir(cfg: DfkdConfig) -> Path:
    return cfg.path(STUDENT)


def student_work_dir(cfg: DfkdConfig) -> Path:
    """The distillation's resumable checkpoint (core/distill.CHECKPOINT); never versioned."""
    return cfg.work_dir / STUDENT


def write_student(cfg: DfkdConfig, student, history: list[dict]) -> Path:
    """Weights + architecture (core/student.py) and the per-epoch history as CSV."""
    from dfkd_assets.core.io import atomic_write_text

    out = student_dir(cfg)
    student.save(out)
    columns = list(dict.fromkeys(k for h in history for k in h))  # epoch, kd_loss (the total), loss_<term>..., metrics, lr
    csv = ",".join(columns) + "\n" + "".join(",".join(str(h.get(k, "")) for k in columns) + "\n" for h in history)
    atomic_write_text(out / "history.csv", csv)
    return out


def write_student_record(cfg: DfkdConfig, record: StudentRecord) -> None:
    from dfkd_assets.core.io import atomic_write_json

    atomic_write_json(student_dir(cfg) / "registry.json", asdict(record))


def read_student_record(cfg: DfkdConfig) -> StudentRecord:
    path = student_dir(cfg) / "registry.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialize student_model first")
    return StudentRecord(**json.loads(path.read_text()))


def read_student(cfg: DfkdConfig):
    from dfkd_assets.core.student import load_student

    return load_student(student_dir(cfg))


def read_student_weights(cfg: DfkdConfig) -> dict:
    from safetensors.torch import load_file

    from dfkd_assets.core.student import WEIGHTS

    return load_file(student_dir(cfg) / WEIGHTS)


def write_params(cfg: DfkdConfig) -> Path:
    """data/params.yaml for `dvc params diff`: the settings with URL passwords masked."""
    from dfkd_assets.core.io import atomic_write_text

    path = cfg.data_dir / "params.yaml"
    atomic_write_text(path, yaml.safe_dump(cfg.public_dump(), sort_keys=False))
    return path


# ---- evaluation ---------------------------------------------------------------------------------

def reports_dir(cfg: DfkdConfig) -> Path:
    return cfg.path(REPORTS)


def write_evaluation(cfg: DfkdConfig, metrics: dict, per_domain_csv: str, report_md: str) -> Path:
    """metrics.json (`dvc metrics`; NaN/inf written as null), per_domain.csv (`dvc plots`), report.md."""
    from dfkd_assets.core.io import atomic_write_json, atomic_write_text

    out = reports_dir(cfg)
    atomic_write_json(out / "metrics.json", _json_safe(metrics))
    atomic_write_text(out / "per_domain.csv", per_domain_csv)
    atomic_write_text(out / "report.md", report_md)
    return out


def metrics_path(cfg: DfkdConfig) -> Path:
    return reports_dir(cfg) / "metrics.json"


def round_curve_png(cfg: DfkdConfig) -> Path:
    return reports_dir(cfg) / "round_curve.png"


def fewshot_files(cfg: DfkdConfig) -> dict[str, Path]:
    """The few-shot report's files: json (rows), png (curves), md (table)."""
    return {kind: reports_dir(cfg) / f"fewshot.{kind}" for kind in ("json", "png", "md")}


def run_failures_log(cfg: DfkdConfig) -> Path:
    """Every failed run, one JSON line each (sensor `record_failures`)."""
    return cfg.storage_dir / "run_failures.jsonl"


def read_metrics(cfg: DfkdConfig) -> dict:
    path = metrics_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialize evaluation_report first")
    return json.loads(path.read_text())


def _json_safe(obj):
    import math

    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- export -------------------------------------------------------------------------------------

def export_dir(cfg: DfkdConfig) -> Path:
    return cfg.path(EXPORT)


def onnx_export(cfg: DfkdConfig) -> Path:
    """The champion's fp32 ONNX export (champion_onnx), which champion_int8 quantizes."""
    return export_dir(cfg) / "champion.onnx"


def onnx_record(cfg: DfkdConfig) -> Path:
    """champion.json: which champion version the ONNX export is, its parity and its `<name>-onnx` URI (None: not registered)."""
    return export_dir(cfg) / "champion.json"


def read_onnx_record(cfg: DfkdConfig) -> dict:
    path = onnx_record(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: materialize champion_onnx first")
    return json.loads(path.read_text())


def int8_export(cfg: DfkdConfig) -> Path:
    """The int8 model (champion_int8); its record, with the measured accuracies, beside it."""
    return export_dir(cfg) / "champion.int8.onnx"
