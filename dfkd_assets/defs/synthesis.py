"""Asset `synthetic_images`, one partition per class (ALGORITHM.md §3).

Resumable: every finished batch is saved under data/.work/synthetic/<class>/ with a fingerprint
of everything that determines it; a re-run after a crash recomputes only missing batches, and
the final shard is identical to an uninterrupted run (seeds depend on (seed, class, index) only).
A shard whose manifest already carries the current fingerprint is reused as it is.
"""


import shutil

import dagster as dg

from dfkd_assets.defs.errors import no_retry_for_bad_input
from dfkd_assets.defs.placement import GPU_OP_TAGS

from dfkd_assets.config import class_key
from dfkd_assets.defs.fingerprints import class_fingerprint
from dfkd_assets.defs.lineage import lineage, md_image
from dfkd_assets.loaders import device_lease, generator_for, head_for, synthesis_settings, teacher_for
from dfkd_assets.defs.resources import PipelineSettings

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
        import numpy as np
        import torch

        from dfkd_assets.core.io import ShardError, encode_png, exclusive_lock, read_manifest, write_shard
        from dfkd_assets.core.progress import Progress
        from dfkd_assets.core.prompts import PromptBank
        from dfkd_assets.core.report import write_grid
        from dfkd_assets.core.seeding import derive_seed
        from dfkd_assets.core.synthesis import synthesize_resumable

        cfg = settings.load()
        class_name = cfg.class_for_key(context.partition_key)
        # one run per class at a time, taken before a device: the second run of a class waits, then reuses the first's shard
        class_lock = cfg.work_dir / "synthetic" / f"{class_key(class_name)}.lock"
        with exclusive_lock(class_lock, on_wait=context.log.info), device_lease(cfg) as device:
            teacher = teacher_for(cfg, device)
            bank = PromptBank.load(cfg.path("prompt_bank"))
            bank.check_teacher(teacher.teacher_id)
            k = bank.class_index(class_name)
            head = head_for(cfg, teacher, device)
            fp = class_fingerprint(cfg, teacher.teacher_id, class_name)
            out_dir = cfg.class_dir(class_name)
            grid_path = cfg.path("previews") / f"{class_key(class_name)}.png"
            # temp files of a run killed while writing this class (atomic writes only rename complete
            # files); safe under the class lock, and `dvc add` would otherwise version them
            for stale in out_dir.glob(".*.tmp"):
                stale.unlink()

            try:
                existing = read_manifest(out_dir)
            except (ShardError, ValueError):
                existing = None
            if existing and existing.get("fingerprint") == fp and (out_dir / existing["shard"]).is_file():
                context.log.info(f"{class_name}: shard with fingerprint {fp} already exists, reusing it")
                manifest, elapsed, reused, resumed = existing, 0.0, True, 0
            else:
                reused = False
                n = cfg.synthesis.images_per_class
                styles = bank.assignments(class_name, n)
                seeds = [derive_seed(cfg.synthesis.seed, class_name, i) for i in range(n)]
                targets = torch.stack([bank.features[s, k] for s in styles]).to(device)
                sset = synthesis_settings(cfg, device)
                prog = Progress(n * sset.iterations, f"synthesis[{class_name}]", context.log.info, unit="img-steps")
                out = synthesize_resumable(
                    generator_for(cfg, device), teacher, head, targets, seeds, sset, cfg.synthesis.batch_size,
                    work_dir=cfg.work_dir / "synthetic" / class_key(class_name), fingerprint=fp,
                    on_step=lambda m, loss: prog.update(m, **({} if loss != loss else {"loss": loss})),
                )
                elapsed = prog.close()
                images, resumed = out.images, out.resumed
                if resumed:
                    context.log.info(f"{class_name}: {resumed} of {n} images kept from an interrupted run's finished batches")
                records = [
                    {
                        "index": i, "class": class_name, "style_id": styles[i], "prompt": bank.prompts[styles[i]][k],
                        "seed": int(out.seeds[i]), "final_cosine": round(float(out.cosines[i]), 6),
                        "teacher_top1": cfg.classes[int(out.preds[i])],
                        # non-finite with its own seed: remade from a seed derived from it (core.synthesis.nonfinite_retry_seed)
                        **({"requested_seed": seeds[i]} if int(out.seeds[i]) != seeds[i] else {}),
                    }
                    for i in range(n)
                ]
                items = [(f"{class_key(class_name)}_{i:06d}.png", encode_png(images[i])) for i in range(n)]
                manifest = write_shard(
                    out_dir, items, records,
                    meta={"class": class_name, "fingerprint": fp, "teacher_id": teacher.teacher_id, "image_size": cfg.synthesis.image_size},
                )
                cols = bank.num_styles if 1 < bank.num_styles <= 16 else 8  # images cycle through styles: a column per style
                write_grid(grid_path, images[: min(4 * cols, n)], cols=cols)
                shutil.rmtree(cfg.work_dir / "synthetic" / class_key(class_name), ignore_errors=True)

            recs = manifest["images"]
            agree = float(np.mean([r["teacher_top1"] == class_name for r in recs]))
            mean_cos = float(np.mean([r["final_cosine"] for r in recs]))
            meta = {
                "class": class_name,
                "num_images": len(recs),
                "mean_final_cosine": mean_cos,
                "teacher_agreement": agree,
                "shard": dg.MetadataValue.path(str((out_dir / manifest["shard"]).resolve())),
                "shard_sha256": manifest["shard_sha256"],
                "fingerprint": fp,
                "reused": reused,
                "resumed_images": resumed,
                "reseeded_nonfinite": sum("requested_seed" in r for r in recs),
                "seeds": f"derive_seed({cfg.synthesis.seed}, {class_name!r}, index)",
                **lineage(cfg, context, teacher_id=teacher.teacher_id),
            }
            if not reused and elapsed > 0:
                meta["images_per_second"] = len(recs) / elapsed
            if grid_path.is_file():
                meta["preview"] = dg.MetadataValue.md(md_image(grid_path, f"samples of {class_name}"))
            context.log.info(f"{class_name}: {len(recs)} images, mean cosine {mean_cos:.3f}, teacher agreement {agree:.2f}")
            return dg.MaterializeResult(metadata=meta)

    return synthetic_images
