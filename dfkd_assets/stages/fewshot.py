"""Stage 6 (with `fewshot.enabled`): few-shot fine-tuning curves of the distilled student against
the same architecture from scratch and, with local weights, from ImageNet (docs/ALGORITHM.md §5)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from dfkd_assets.config import DfkdConfig


def few_shot(cfg: DfkdConfig, student, device, log: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Rows {start, domain, shots, seed, top1}: every start fine-tuned on k labelled images per class
    of each evaluation domain, tested on the rest of that domain."""
    from dfkd_assets.core.evaluation import load_image
    from dfkd_assets.core.fewshot import copy_of, few_shot_curves, load_backbone_weights
    from dfkd_assets.core.weights import read_state_dict
    from dfkd_assets.loaders import eval_sets, fewshot_settings, fresh_student

    fs, size = cfg.fewshot, cfg.student.input_size

    def scratch():
        return fresh_student(cfg)

    starts = {"distilled": copy_of(student), "scratch": scratch}
    if fs.imagenet_weights is not None:
        if not fs.imagenet_weights.is_file():
            raise FileNotFoundError(f"fewshot.imagenet_weights {fs.imagenet_weights} not found")
        imagenet = read_state_dict(fs.imagenet_weights)
        starts["imagenet"] = lambda: load_backbone_weights(scratch(), imagenet, str(fs.imagenet_weights))
    domains = {
        f"{name}/{ds.domain}": (np.stack([load_image(p, size) for p in ds.paths]), np.asarray(ds.labels))
        for name, sets in eval_sets(cfg).items() for ds in sets
    }
    return few_shot_curves(starts, domains, len(cfg.classes), fewshot_settings(cfg), device, log)


def few_shot_summary(rows: list[dict], shots: list[int]) -> tuple[dict, str, dict[int, float], dict[tuple[str, int], float]]:
    """(start, domain, shots) -> (mean, std) over seeds; its markdown table; distilled minus scratch per k;
    mean over domains per (start, k)."""
    from dfkd_assets.core.fewshot import summarize
    from dfkd_assets.core.report import markdown_table

    summary = summarize(rows)
    table = markdown_table([{"start": s, "domain": d, "shots": k, "top1 (mean ± std)": f"{m:.3f} ± {e:.3f}"} for (s, d, k), (m, e) in summary.items()],
                           ["start", "domain", "shots", "top1 (mean ± std)"])
    starts = list(dict.fromkeys(s for s, _, _ in summary))
    per_k = {(start, k): float(np.mean([m for (s, _, kk), (m, _) in summary.items() if s == start and kk == k])) for start in starts for k in shots}
    gain = {k: per_k[("distilled", k)] - per_k[("scratch", k)] for k in shots}
    return summary, table, gain, per_k
