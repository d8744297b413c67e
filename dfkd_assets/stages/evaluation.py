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
    # a champion trained for another class list: the classes both serve (challenger's order) and
    # 'student' / 'champion' -> mean over domains of top-1 on those classes' images (`compare_on_shared`)
    shared_classes: list[str] = field(default_factory=list)
    shared_top1: dict[str, float] = field(default_factory=dict)

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


SHARED = "@shared"  # suffix of a helper predictor restricted to the shared classes; never reported as a model


def shared_classes(classes: list[str], other: list[str]) -> list[str]:
    """The classes of `classes` that `other` serves too (exact names), in the order of `classes`."""
    theirs = set(other)
    return [c for c in classes if c in theirs]


def restricted(predict, model_classes: list[str], classes: list[str], shared: list[str]):
    """`predict`'s logits laid out in the order of `classes`: the columns of the shared classes taken
    from the model's own columns by name, every other column -inf, so its top-1 is always a shared class."""
    src, dst = [model_classes.index(c) for c in shared], [classes.index(c) for c in shared]

    def fn(x):
        logits = predict(x)
        out = logits.new_full((logits.shape[0], len(classes)), float("-inf"))
        out[:, dst] = logits[:, src]
        return out

    return fn


def champion_predictors(classes: list[str], student, champion, champion_classes: list[str]) -> dict:
    """What compares the challenger with the champion: the champion itself when it serves the same
    classes; otherwise both models restricted to the classes both serve (`restricted`), as helper
    predictors that `compare_on_shared` turns into the shared-class scores."""
    if list(champion_classes) == list(classes):
        return {"champion": champion}
    shared = shared_classes(classes, champion_classes)
    return {f"student{SHARED}": restricted(student, classes, classes, shared), f"champion{SHARED}": restricted(champion, champion_classes, classes, shared)}


def shared_top1(confusion: dict[str, np.ndarray], rows: list[int]) -> float:
    """Mean over domains of top-1 on the images whose label is one of `rows` (confusion rows = truth);
    for a predictor restricted to those classes this is its top-1 on the classes both models serve."""
    return float(np.mean([np.trace(cm[np.ix_(rows, rows)]) / max(cm[rows].sum(), 1) for cm in confusion.values()]))


def compare_on_shared(ev: Evaluation, classes: list[str], champion_classes: list[str]) -> Evaluation:
    """The evaluation without the helper predictors of `champion_predictors`, their shared-class
    scores recorded instead (the tables, confusions and run metrics stay the real models')."""
    helpers = [m for m in ev.models if m.endswith(SHARED)]
    if not helpers:
        return ev
    shared = shared_classes(classes, champion_classes)
    rows = [classes.index(c) for c in shared]
    return Evaluation({m: v for m, v in ev.top1.items() if m not in helpers}, ev.counts, ev.chance,
                      {m: v for m, v in ev.confusion.items() if m not in helpers}, shared,
                      {m.removesuffix(SHARED): shared_top1(ev.confusion[m], rows) for m in helpers})


def shared_line(ev: Evaluation, champion: str | None) -> str:
    """One sentence on the shared-class comparison; empty when the class lists are the same."""
    if not ev.shared_classes:
        return ""
    return (f"Champion v{champion} serves another class list: compared on the {len(ev.shared_classes)} classes both serve "
            f"({', '.join(ev.shared_classes)}), top-1 on their images with the other classes masked: "
            f"student {ev.shared_top1['student']:.4f}, champion {ev.shared_top1['champion']:.4f}.")


def metrics_record(ev: Evaluation, challenger_version: str, champion_compared: str | None, champion_seen: str | None) -> dict:
    """metrics.json: what `dvc metrics` shows and what the promotion rule reads."""
    ratio = ev.transfer()
    shared = {"shared_classes": ev.shared_classes, **{f"{m}_shared_mean_top1": v for m, v in ev.shared_top1.items()}} if ev.shared_classes else {}
    return {
        "challenger_version": challenger_version,
        "champion_version": champion_compared,  # the champion compared against (on all classes or on shared_classes)
        "champion_seen": champion_seen,  # the alias at evaluation time, compared or not (too few classes in common)
        "chance": ev.chance,
        **{f"{m}_mean_top1": v for m, v in ev.mean.items()},
        **shared,
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


def report_markdown(ev: Evaluation, title: str, teacher_id: str, data_version: str, confusion_pngs: list[tuple[str, str]],
                    champion: str | None = None) -> str:
    """report.md: the per-domain table, the shared-class comparison with `champion` if there was one,
    and the (domain, png file name) confusion matrices."""
    shared = shared_line(ev, champion)
    return (
        f"# {title}\n\n"
        f"Top-1 accuracy per domain; chance = {ev.chance:.3f}; transfer = (student - chance) / (teacher - chance), "
        f"the share of the teacher's above-chance accuracy the student inherited. Teacher: `{teacher_id}`. "
        f"Data: DVC `{data_version}`.\n\n{per_domain_table(ev)}\n\n" + (f"{shared}\n\n" if shared else "") + "## Confusion matrices (student)\n\n"
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
