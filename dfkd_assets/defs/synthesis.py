"""Assets `synthetic_images` (round 0, one partition per class) and `synthetic_round_images`
(rounds >= 1, one partition per class x round) (stage: dfkd_assets/stages/synthesis.py).

Resumable: every finished batch is saved under data/.work/synthetic/<class>/ with a fingerprint
of everything that determines it; a re-run after a crash recomputes only missing batches, and
the final shard is identical to an uninterrupted run (seeds depend on (seed, class, index) only).
A shard whose manifest already carries the current fingerprint is reused as it is.

Rounds (docs/ARCHITECTURE.md): each run of the `retrain` schedule adds a round r, a dynamic
partition key of `synthesis_rounds`; `synthetic_round_images` is partitioned class x round, so the
UI's partition grid shows which rounds each class has, and one cell can be backfilled (or a round
dropped: `dfkd rounds drop`). One run makes every cell it is given (single-run backfill policy),
each under its class's lock, into `round_NNN/` beside the earlier shards, which it never touches.
"""


import shutil

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.core.names import class_key
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.placement import gpu_asset
from dfkd_assets.defs.resources import MlflowTracking, PipelineSettings
from dfkd_assets.fingerprints import round_fingerprint
from dfkd_assets.loaders import device_lease, generator_for, teacher_for

ASSET_KEY = "synthetic_images"
ROUND_ASSET_KEY = "synthetic_round_images"
STUDENT_AWARE = "student_aware"  # manifest key of a round made against a registered student: {model, version, student_weight}
ROUNDS = dg.DynamicPartitionsDefinition(name="synthesis_rounds")
CLASS_DIM, ROUND_DIM = "class", "round"


def round_partitions(classes: dg.StaticPartitionsDefinition) -> dg.MultiPartitionsDefinition:
    """class x round: the static class keys by the rounds added so far (dynamic)."""
    return dg.MultiPartitionsDefinition({CLASS_DIM: classes, ROUND_DIM: ROUNDS})


def round_cell(key: str) -> tuple[str, int]:
    """(class key, round) of a class x round partition key ('dog|3': dimensions in name order)."""
    class_part, round_part = str(key).split("|")
    return class_part, int(round_part)


def build_synthetic_images(partitions_def: dg.StaticPartitionsDefinition) -> dg.AssetsDefinition:
    @gpu_asset(
        name=ASSET_KEY,
        group_name="synthesis",
        partitions_def=partitions_def,
        deps=["prompt_bank", "teacher_head"],
        kinds={"pytorch"},
        description="VQGAN-CLIP images of one class: one tar shard of PNGs + manifest (sha256 per image).",
    )
    def synthetic_images(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
        from dfkd_assets.stages.synthesis import shard_summary

        cfg = settings.load()
        class_name = cfg.class_for_key(context.partition_key)
        manifest, meta, fp, teacher_id = make_shard(cfg, context, class_name)
        summary = shard_summary(class_name, manifest["images"])
        context.log.info(f"{class_name}: {summary['num_images']} images, mean cosine {summary['mean_final_cosine']:.3f}, "
                         f"teacher agreement {summary['teacher_agreement']:.2f}"
                         + (f"; {meta['resumed_images']} kept from an interrupted run's finished batches" if meta["resumed_images"] else ""))
        return dg.MaterializeResult(metadata={**summary, **meta, **_shard_metadata(cfg, context, class_name, manifest, fp, teacher_id)})

    return synthetic_images


def make_shard(cfg, context, class_name: str, round_: int = 0, against: tuple[str, object] | None = None) -> tuple[dict, dict, str, str]:
    """The synthesis protocol of a class (round 0) or of one class x round cell: (manifest, metadata,
    fingerprint, teacher id).

    Under the class's lock (taken before a device: a second run of the class waits, then reuses
    the first's shard), the prompt bank must come from this teacher and hold the class (a class the
    bank lacks fails here, before any reuse); temp files of a killed write are removed; a shard that
    carries the current fingerprint is reused; a round that would cross
    operations.max_images_per_class is refused; otherwise the shard is synthesized, resuming the
    finished batches of an interrupted run. `against` (version, student): a student-aware round is
    made against that registered student (core/synthesis.Competition), recorded in the manifest."""
    from dfkd_assets.core.io import exclusive_lock
    from dfkd_assets.core.rounds import CapError, next_growth

    label = class_name + (f" round {round_}" if round_ else "")
    with exclusive_lock(artifacts.class_lock(cfg, class_name), on_wait=context.log.info), device_lease(cfg) as device:
        teacher = teacher_for(cfg, device)
        bank = artifacts.read_prompt_bank(cfg)
        bank.check_teacher(teacher.teacher_id)
        bank.class_index(class_name)
        fp = round_fingerprint(cfg, teacher.teacher_id, class_name, round_)  # round 0: the class fingerprint
        artifacts.remove_partial_writes(cfg, class_name, round_)
        manifest = artifacts.current_shard(cfg, class_name, fp, round_)
        if manifest is not None:
            context.log.info(f"{label}: shard with fingerprint {fp} already exists, reusing it")
            return manifest, {"reused": True, "resumed_images": 0}, fp, teacher.teacher_id
        if round_:
            growth = next_growth(round_, artifacts.images_before_round(cfg, class_name, round_), cfg.operations.images_per_round or 0,
                                 cfg.operations.max_images_per_class)
            if not growth.fits:
                raise CapError(f"{label}: {growth.reason}")
        artifacts.check_prompt_bank_inputs(cfg)  # new images only from a bank of the current prompt inputs (reuse above needs none)
        head = artifacts.read_teacher_head(cfg, teacher, device)
        manifest, meta = _synthesize(cfg, context, class_name, bank, teacher, head, device, fp, round_, against)
        return manifest, meta, fp, teacher.teacher_id


def _synthesize(cfg, context, class_name: str, bank, teacher, head, device, fp: str, round_: int = 0,
                against: tuple[str, object] | None = None) -> tuple[dict, dict]:
    """Plan, synthesize (resuming finished batches), write the shard and (round 0) its preview: (manifest, metadata)."""
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.stages.synthesis import class_plan, synthesize_class

    plan = class_plan(cfg, bank, class_name, round_)
    label = class_name + (f" round {round_}" if round_ else "")
    work = artifacts.class_work_dir(cfg, class_name, round_)
    prog = Progress(len(plan.seeds) * cfg.synthesis.iterations, f"synthesis[{label}]", context.log.info, unit="img-steps")
    out = synthesize_class(cfg, plan, bank, generator_for(cfg, device), teacher, head, device, work, fp,
                           on_step=lambda m, loss: prog.update(m, **({} if loss != loss else {"loss": loss})),
                           student=None if against is None else against[1])
    elapsed = prog.close()
    made_against = {} if against is None else {STUDENT_AWARE: {"model": cfg.mlflow.registered_model_name, "version": against[0],
                                                                 "student_weight": cfg.synthesis.student_weight}}
    manifest = artifacts.write_class_shard(cfg, class_name, out.images, out.records,
                                           {"fingerprint": fp, "teacher_id": teacher.teacher_id, "image_size": cfg.synthesis.image_size,
                                            **made_against}, round_)
    if round_ == 0:
        _write_preview(cfg, class_name, out.images, bank.num_styles)
    shutil.rmtree(work, ignore_errors=True)
    return manifest, {"reused": False, "resumed_images": out.resumed, **({"images_per_second": len(out.records) / elapsed} if elapsed > 0 else {})}


def _write_preview(cfg, class_name: str, images, num_styles: int) -> None:
    from dfkd_assets.core.report import write_grid

    cols = num_styles if 1 < num_styles <= 16 else 8  # images cycle through styles: a column per style
    write_grid(artifacts.class_preview(cfg, class_name), images[: min(4 * cols, len(images))], cols=cols)


def _shard_metadata(cfg, context, class_name: str, manifest: dict, fp: str, teacher_id: str) -> dict:
    meta = {
        "class": class_name,
        "shard": dg.MetadataValue.path(str((cfg.class_dir(class_name) / manifest["shard"]).resolve())),
        "shard_sha256": manifest["shard_sha256"],
        "fingerprint": fp,
        "seeds": f"derive_seed({cfg.synthesis.seed}, {class_name!r}, index)",
        **lineage(cfg, context, teacher_id=teacher_id),
    }
    preview = artifacts.class_preview(cfg, class_name)
    if preview.is_file():
        meta["preview"] = dg.MetadataValue.md(md_image(preview, f"samples of {class_name}"))
    return meta


def build_synthetic_rounds(partitions_def: dg.MultiPartitionsDefinition) -> dg.AssetsDefinition:
    @gpu_asset(
        name=ROUND_ASSET_KEY,
        group_name="synthesis",
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),  # a round of every class is one run (one model load)
        deps=["prompt_bank", "teacher_head",
              dg.AssetDep(ASSET_KEY, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=CLASS_DIM))],
        kinds={"pytorch"},
        description="operations.images_per_round more images of a class in round r >= 1 (fresh seeds), a shard beside the earlier rounds'.",
    )
    def synthetic_round_images(context: dg.AssetExecutionContext, settings: PipelineSettings,
                               mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
        cfg = settings.load()
        cells = [(cfg.class_for_key(k), r) for k, r in map(round_cell, context.partition_keys)]
        against = _champion_to_compete(cfg, mlflow_tracking, context.log)
        per_cell = {f"{class_key(c)}|{r}": _make_round(cfg, context, c, r, against) for c, r in cells}
        context.log.info("; ".join(f"{k}: {m['num_images']} images ({'reused' if m['reused'] else 'new'})" for k, m in per_cell.items()))
        return dg.MaterializeResult(metadata={
            "cells": dg.MetadataValue.json(per_cell),
            "fingerprints": dg.MetadataValue.json({k: m["fingerprint"] for k, m in per_cell.items()}),
            "num_images": sum(m["num_images"] for m in per_cell.values()),
            **lineage(cfg, context),
        })

    return synthetic_round_images


def _champion_to_compete(cfg, tracking: MlflowTracking, log) -> tuple[str, object] | None:
    """(version, network) of the champion a student-aware round is made against (synthesis.student_weight
    > 0), None for the paper's synthesis. Without a champion, or with one for other classes, the round
    is refused before anything is made: the setting asks for a student the registry does not hold."""
    from dfkd_assets.defs.registry import ModelRegistry

    if not cfg.synthesis.student_weight:
        return None
    registry = ModelRegistry(cfg, tracking)
    version = registry.champion()
    if version is None:
        raise ValueError(f"synthesis.student_weight ({cfg.synthesis.student_weight}) makes rounds against the champion student, and "
                         f"model {registry.name} has none: run the train job first (round 0), or set synthesis.student_weight: 0")
    student = registry.load(version)
    if list(student.classes) != list(cfg.classes):
        raise ValueError(f"synthesis.student_weight: champion v{version} of {registry.name} serves {student.classes}, not the configured "
                         f"classes {cfg.classes}: train a student of these classes first, or set synthesis.student_weight: 0")
    log.info(f"student-aware round: images are also pushed to where champion v{version} disagrees with the teacher "
             f"(synthesis.student_weight {cfg.synthesis.student_weight})")
    return version, student


def _make_round(cfg, context, class_name: str, round_: int, against: tuple[str, object] | None = None) -> dict:
    """One class x round cell (make_shard), summarised for the run's metadata."""
    from dfkd_assets.stages.synthesis import shard_summary

    manifest, meta, fp, _ = make_shard(cfg, context, class_name, round_, against)
    return {**shard_summary(class_name, manifest["images"]), **meta, "fingerprint": fp,
            **({STUDENT_AWARE: manifest[STUDENT_AWARE]} if STUDENT_AWARE in manifest else {}),
            "shard_sha256": manifest["shard_sha256"], "seeds": f"derive_seed({cfg.synthesis.seed}, {class_name!r}, 'round', {round_}, index)"}
