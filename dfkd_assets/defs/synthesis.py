"""Asset `synthetic_images`, one partition per class (stage: dfkd_assets/stages/synthesis.py).

Resumable: every finished batch is saved under data/.work/synthetic/<class>/ with a fingerprint
of everything that determines it; a re-run after a crash recomputes only missing batches, and
the final shard is identical to an uninterrupted run (seeds depend on (seed, class, index) only).
A shard whose manifest already carries the current fingerprint is reused as it is.
"""


import shutil

import dagster as dg

from dfkd_assets import artifacts
from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.defs.placement import GPU_OP_TAGS
from dfkd_assets.defs.resources import PipelineSettings
from dfkd_assets.fingerprints import class_fingerprint
from dfkd_assets.loaders import device_lease, generator_for, teacher_for

ASSET_KEY = "synthetic_images"


def build_synthetic_images(partitions_def: dg.StaticPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name=ASSET_KEY,
        group_name="synthesis",
        partitions_def=partitions_def,
        deps=["prompt_bank", "teacher_head"],
        pool="gpu",
        op_tags=GPU_OP_TAGS,
        kinds={"pytorch"},
        description="VQGAN-CLIP images of one class: one tar shard of PNGs + manifest (sha256 per image).",
    )
    @no_retry_for_bad_input
    def synthetic_images(context: dg.AssetExecutionContext, settings: PipelineSettings) -> dg.MaterializeResult:
        from dfkd_assets.core.io import exclusive_lock
        from dfkd_assets.stages.synthesis import shard_summary

        cfg = settings.load()
        class_name = cfg.class_for_key(context.partition_key)
        # one run per class at a time, taken before a device: the second run of a class waits, then reuses the first's shard
        with exclusive_lock(artifacts.class_lock(cfg, class_name), on_wait=context.log.info), device_lease(cfg) as device:
            teacher = teacher_for(cfg, device)
            bank = artifacts.read_prompt_bank(cfg)
            bank.check_teacher(teacher.teacher_id)
            bank.class_index(class_name)  # a class the bank lacks fails here, before any reuse
            head = artifacts.read_teacher_head(cfg, teacher, device)
            fp = class_fingerprint(cfg, teacher.teacher_id, class_name)
            artifacts.remove_partial_writes(cfg, class_name)
            manifest = artifacts.current_shard(cfg, class_name, fp)
            if manifest is None:
                manifest, meta = _synthesize(cfg, context, class_name, bank, teacher, head, device, fp)
            else:
                context.log.info(f"{class_name}: shard with fingerprint {fp} already exists, reusing it")
                meta = {"reused": True, "resumed_images": 0}
            summary = shard_summary(class_name, manifest["images"])
            context.log.info(f"{class_name}: {summary['num_images']} images, mean cosine {summary['mean_final_cosine']:.3f}, "
                             f"teacher agreement {summary['teacher_agreement']:.2f}"
                             + (f"; {meta['resumed_images']} kept from an interrupted run's finished batches" if meta["resumed_images"] else ""))
            return dg.MaterializeResult(metadata={**summary, **meta, **_shard_metadata(cfg, context, class_name, manifest, fp, teacher.teacher_id)})

    return synthetic_images


def _synthesize(cfg, context, class_name: str, bank, teacher, head, device, fp: str) -> tuple[dict, dict]:
    """Plan, synthesize (resuming finished batches), write the shard and its preview: (manifest, metadata)."""
    from dfkd_assets.core.progress import Progress
    from dfkd_assets.stages.synthesis import class_plan, synthesize_class

    plan = class_plan(cfg, bank, class_name)
    prog = Progress(len(plan.seeds) * cfg.synthesis.iterations, f"synthesis[{class_name}]", context.log.info, unit="img-steps")
    out = synthesize_class(cfg, plan, bank, generator_for(cfg, device), teacher, head, device, artifacts.class_work_dir(cfg, class_name), fp,
                           on_step=lambda m, loss: prog.update(m, **({} if loss != loss else {"loss": loss})))
    elapsed = prog.close()
    manifest = artifacts.write_class_shard(cfg, class_name, out.images, out.records,
                                           {"fingerprint": fp, "teacher_id": teacher.teacher_id, "image_size": cfg.synthesis.image_size})
    _write_preview(cfg, class_name, out.images, bank.num_styles)
    shutil.rmtree(artifacts.class_work_dir(cfg, class_name), ignore_errors=True)
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
