"""Stage 5: top-1 per domain of several models on the same images, the transfer ratio, and the
tables built from them (docs/ALGORITHM.md §5). The evaluation asset and `dfkd compare` both report
through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dfkd_assets.config import DfkdConfig


@dataclass
class Evaluation:
    """Top-1 of each model per domain ('<dataset>/<domain>'), on the same images."""

    top1: dict[str, dict[str, float]]  # model -> domain -> accuracy
    counts: dict[str, int]  # domain -> images
    chance: float
    confusion: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # model -> domain -> [K,K]

    @property
    def models(self) -> list[str]:
        return list(self.top1)

    @property
    def domains(self) -> list[str]:
        return list(self.counts)

    @property
    def mean(self) -> dict[str, float]:
        return {m: float(np.mean([self.top1[m][d] for d in self.domains])) for m in self.models}

    def transfer(self, model: str = "student", reference: str = "teacher") -> dict[str, float]:
        """(model - chance) / (reference - chance) per domain."""
        from dfkd_assets.core.evaluation import transfer_ratio

        return {d: transfer_ratio(self.top1[model][d], self.top1[reference][d], self.chance) for d in self.domains}

    def mean_transfer(self, model: str = "student", reference: str = "teacher") -> float:
        ratios = list(self.transfer(model, reference).values())
        return float(np.nanmean(ratios)) if any(np.isfinite(ratios)) else float("nan")


def evaluate_models(cfg: DfkdConfig, predictors: dict, sets: dict[str, list], device, image_size: int) -> Evaluation:
    """Every predictor (name -> images [B,3,S,S] in [0,1] -> logits) on every evaluation set
    (`loaders.eval_sets`), each image loaded once at `image_size` for all of them."""
    from dfkd_assets.core.evaluation import evaluate

    top1 = {m: {} for m in predictors}
    confusion = {m: {} for m in predictors}
    counts: dict[str, int] = {}
    for name, domain_sets in sets.items():
        res = evaluate(predictors, domain_sets, len(cfg.classes), image_size, cfg.evaluation.batch_size, device, prefix=f"{name}/")
        for m, r in res.items():
            top1[m].update(r.top1)
            confusion[m].update(r.confusion)
            counts.update(r.counts)
    return Evaluation(top1, counts, 1.0 / len(cfg.classes), confusion)


def metrics_record(ev: Evaluation, challenger_version: str, champion_compared: str | None, champion_seen: str | None) -> dict:
    """metrics.json: what `dvc metrics` shows and what the promotion rule reads."""
    ratio = ev.transfer()
    return {
        "challenger_version": challenger_version,
        "champion_version": champion_compared,  # the champion compared against
        "champion_seen": champion_seen,  # the alias at evaluation time, compared or not (other classes)
        "chance": ev.chance,
        **{f"{m}_mean_top1": v for m, v in ev.mean.items()},
        "mean_transfer_ratio": ev.mean_transfer(),
        "per_domain": {d: {m: ev.top1[m][d] for m in ev.models} | {"images": ev.counts[d], "transfer_ratio": ratio[d]} for d in ev.domains},
    }


def per_domain_csv(ev: Evaluation) -> str:
    ratio = ev.transfer()
    return "domain," + ",".join(ev.models) + ",transfer_ratio\n" + "".join(
        f"{d}," + ",".join(f"{ev.top1[m][d]:.6f}" for m in ev.models) + f",{ratio[d]:.6f}\n" for d in ev.domains
    )


def per_domain_table(ev: Evaluation) -> str:
    """Markdown: one row per domain and a mean row; models, chance and the student's transfer."""
    from dfkd_assets.core.report import markdown_table

    ratio = ev.transfer()
    rows = [{"domain": d, "images": ev.counts[d], **{m: ev.top1[m][d] for m in ev.models}, "chance": ev.chance, "transfer": ratio[d]}
            for d in ev.domains]
    rows.append({"domain": "**mean**", "images": sum(ev.counts.values()), **ev.mean, "chance": ev.chance, "transfer": ev.mean_transfer()})
    return markdown_table(rows, ["domain", "images", *ev.models, "chance", "transfer"])


def report_markdown(ev: Evaluation, title: str, teacher_id: str, data_version: str, confusion_pngs: list[tuple[str, str]]) -> str:
    """report.md: the per-domain table and the (domain, png file name) confusion matrices."""
    return (
        f"# {title}\n\n"
        f"Top-1 accuracy per domain; chance = {ev.chance:.3f}; transfer = (student - chance) / (teacher - chance), "
        f"the share of the teacher's above-chance accuracy the student inherited. Teacher: `{teacher_id}`. "
        f"Data: DVC `{data_version}`.\n\n{per_domain_table(ev)}\n\n## Confusion matrices (student)\n\n"
        + "\n".join(f"![{d}]({png})" for d, png in confusion_pngs) + "\n"
    )


def seed_summary(runs: list[dict], teacher: dict[str, float], chance: float) -> tuple[dict, str]:
    """Runs of several variants x seeds ({'method', 'seed', 'top1': {domain: acc}, 'mean', ...}) ->
    (per-variant mean and spread over seeds with the mean transfer, markdown table)."""
    from dfkd_assets.core.evaluation import transfer_ratio
    from dfkd_assets.core.report import markdown_table

    domains = list(teacher)
    rows = [{"method": "teacher (zero-shot)", **{d: f"{teacher[d]:.3f}" for d in domains}, "mean": f"{np.mean(list(teacher.values())):.3f}"}]
    summary = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        per = {d: (float(np.mean([r["top1"][d] for r in rs])), float(np.std([r["top1"][d] for r in rs]))) for d in domains}
        mean = (float(np.mean([r["mean"] for r in rs])), float(np.std([r["mean"] for r in rs])))
        tr = float(np.nanmean([transfer_ratio(per[d][0], teacher[d], chance) for d in domains]))
        summary[m] = {"per_domain": per, "mean": mean, "mean_transfer_ratio": tr, "seeds": [r["seed"] for r in rs],
                      **{k: float(np.mean([r[k] for r in rs])) for k in ("synthesis_s", "distill_s") if k in rs[0]}}
        rows.append({"method": f"{m} (n={len(rs)})", **{d: f"{per[d][0]:.3f} ± {per[d][1]:.3f}" for d in domains},
                     "mean": f"{mean[0]:.3f} ± {mean[1]:.3f}", "transfer": f"{tr:.2f}"})
    rows.append({"method": "chance", **{d: f"{chance:.3f}" for d in domains}, "mean": f"{chance:.3f}"})
    return summary, markdown_table(rows, ["method", *domains, "mean", "transfer"])
