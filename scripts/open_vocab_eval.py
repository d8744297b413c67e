"""Open-vocabulary measurement (issue 21): classes added by name to an embedding student, on the toyworld.

For every seed, through the product's stage functions (as `dfkd compare` does, dfkd_assets/tools/compare.py):
  1. the training images of every class of the settings, synthesised once per seed and cached under
     WORK/<prompts.method>_s<seed>/<class key> (the layout of `dfkd compare`: give it the same --work
     and it reuses that comparison's images and logit-student checkpoints);
  2. `logit_all`: today's logit student distilled on every class (closed vocabulary);
  3. `embedding_all`: an embedding student (`student.head: embedding`) distilled on every class;
  4. `embedding_added`: an embedding student distilled on images synthesised for the classes not
     held out (a prompt bank and synthesis of those classes only), then the held-out classes added by name
     (stages/training.student_for_classes: the teacher's text head, no images of them, no KD);
  5. all three and the teacher's zero-shot head evaluated on every class of the evaluation sets.

Reports per domain: top-1 on all classes, top-1 on the images of the added classes and of the
trained classes (argmax over all classes), and transfer = (student - chance) / (teacher - chance).
The student that gets classes added by name is distilled on images synthesised for the kept
classes alone (their own prompt bank and synthesis under WORK/<method>_s<seed>_without_<held-out>),
so nothing in its training, not even a contrastive style's negatives, knows the held-out names.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/open_vocab_eval.py \\
        --config configs/demo.yaml --seeds 0 1 2 --out storage/open_vocab
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dfkd_assets.config import DfkdConfig, load_config
from dfkd_assets.core.names import class_key
from dfkd_assets.tools.compare import _variant, distill_variant, parse_sets, synthesize_classes, teacher_reference

MODELS = ["teacher", "logit_all", "embedding_all", "embedding_added"]


def _with(v: DfkdConfig, **sections) -> DfkdConfig:
    d = v.model_dump(mode="python")
    for key, value in sections.items():
        if isinstance(value, dict):
            d[key].update(value)
        else:
            d[key] = value
    return DfkdConfig.model_validate(d)


def class_subset_accuracy(confusion: np.ndarray, rows: list[int]) -> float:
    """Top-1 over the images of the classes `rows` (confusion rows: truth), argmax over every class."""
    total = confusion[rows].sum()
    return float(np.trace(confusion[np.ix_(rows, rows)]) / total) if total else float("nan")


def run_seed(cfg: DfkdConfig, seed: int, held_out: list[str], feature_weight: float, work: Path, teacher, head, sets, log,
             models: list[str] = MODELS) -> dict:
    from dfkd_assets.core.teacher import teacher_logits
    from dfkd_assets.stages.evaluation import evaluate_models
    from dfkd_assets.stages.prompts import build_head
    from dfkd_assets.stages.training import student_for_classes

    method = cfg.prompts.method
    v = _variant(cfg, method, seed)
    run_dir = work / f"{method}_s{seed}"
    device = head.device
    t0 = time.perf_counter()
    every = [m for m in ("logit_all", "embedding_all") if m in models]  # students of every class share one synthesis
    per_class = synthesize_classes(v, method, seed, run_dir, teacher, head) if every else None
    t_syn = time.perf_counter() - t0
    keep = [i for i, c in enumerate(v.classes) if c not in held_out]
    emb = _with(v, student={"head": "embedding"}, distill={"feature_weight": feature_weight})
    emb_trained = _with(emb, classes=[v.classes[i] for i in keep])
    t1 = time.perf_counter()
    variants = {"logit_all": v, "embedding_all": emb}
    students = {m: distill_variant(variants[m], teacher, head, per_class, run_dir)[0] for m in every}
    t_all = time.perf_counter() - t1
    # the 4-class student's images come from a prompt bank and synthesis that never saw the held-out
    # names (contrastive styles are learned against the other classes as negatives)
    kept_dir = work / f"{method}_s{seed}_without_{'_'.join(class_key(c) for c in held_out)}"
    kept_head = build_head(emb_trained, teacher).to(device)
    kept_images = synthesize_classes(emb_trained, method, seed, kept_dir, teacher, kept_head)
    trained = distill_variant(emb_trained, teacher, kept_head, kept_images, kept_dir)[0]
    t2 = time.perf_counter()
    students["embedding_added"] = student_for_classes(emb, teacher, trained, "the student distilled without the held-out classes")
    t_add = time.perf_counter() - t2
    predictors = {"teacher": lambda x: teacher_logits(teacher, head, x), **{k: s.to(device).eval() for k, s in students.items()}}
    ev = evaluate_models(v, predictors, sets, device, max(v.student.input_size, teacher.image_size))
    added = [i for i in range(len(v.classes)) if i not in keep]
    out = {"seed": seed, "synthesis_s": t_syn, "distill_all_s": t_all, "add_classes_s": t_add, "models": {}}
    for m in ["teacher", *students]:
        out["models"][m] = {
            "top1": ev.top1[m], "mean": ev.mean[m],
            "added_top1": {d: class_subset_accuracy(ev.confusion[m][d], added) for d in ev.domains},
            "trained_top1": {d: class_subset_accuracy(ev.confusion[m][d], keep) for d in ev.domains},
        }
    log(f"seed {seed}: " + "  ".join(f"{m} {out['models'][m]['mean']:.3f}" for m in out["models"])
        + f"  (classes added by name in {t_add:.2f} s)")
    return out


def _nanmean(values) -> float:
    """Mean of the finite values; NaN, without a warning, when there are none (a teacher at chance)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(runs: list[dict], chance: float) -> dict:
    """Mean and spread over seeds of every number, and the transfer ratios against the teacher."""
    from dfkd_assets.core.evaluation import transfer_ratio

    out = {}
    for m in MODELS:
        runs_m = [r for r in runs if m in r["models"]]  # seeds run with --models leave some students out
        if not runs_m:
            continue
        entry = {"seeds": [r["seed"] for r in runs_m]}
        for key in ("top1", "added_top1", "trained_top1"):
            domains = list(runs_m[0]["models"][m][key])
            per = {d: [r["models"][m][key][d] for r in runs_m] for d in domains}
            entry[key] = {d: {"mean": float(np.mean(v)), "std": float(np.std(v))} for d, v in per.items()}
            entry[key]["mean_over_domains"] = {"mean": float(np.mean([np.mean(v) for v in per.values()])),
                                               "std": float(np.std([np.mean(list(r["models"][m][key].values())) for r in runs_m]))}
            if m != "teacher":
                tr = {d: [transfer_ratio(r["models"][m][key][d], r["models"]["teacher"][key][d], chance) for r in runs_m] for d in domains}
                entry[key.replace("top1", "transfer")] = {
                    "per_domain": {d: _nanmean(v) for d, v in tr.items()},
                    "mean_over_domains": _nanmean([_nanmean(v) for v in tr.values()]),
                    "per_seed": [_nanmean([tr[d][i] for d in domains]) for i in range(len(runs_m))],
                }
        out[m] = entry
    both = [r for r in runs if {"embedding_all", "logit_all"} <= set(r["models"])]
    closed = [r["models"]["embedding_all"]["mean"] - r["models"]["logit_all"]["mean"] for r in both]
    if closed:
        out["embedding_all_minus_logit_all_mean"] = {"mean": float(np.mean(closed)), "std": float(np.std(closed)), "per_seed": closed,
                                                     "seeds": [r["seed"] for r in both]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--held-out", nargs="+", default=["cross", "heart"], help="classes the embedding student is not distilled on, added by name")
    p.add_argument("--feature-weight", type=float, default=1.0, help="distill.feature_weight of the embedding students")
    p.add_argument("--out", type=Path, default=Path("storage/open_vocab"))
    p.add_argument("--work", type=Path, default=None, help="synthesis and KD state (default OUT/work); `dfkd compare --work` layout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. --set distill.epochs=2")
    p.add_argument("--models", nargs="*", choices=["logit_all", "embedding_all"], default=["logit_all", "embedding_all"],
                   help="students of every class to train beside `embedding_added` (always trained); none: only the added-by-name one")
    args = p.parse_args(argv)
    cfg = load_config(args.config, parse_sets(args.set))
    unknown = sorted(set(args.held_out) - set(cfg.classes))
    if unknown or len(args.held_out) >= len(cfg.classes):
        raise SystemExit(f"--held-out {args.held_out}: must be some, not all, of the classes {cfg.classes}")
    args.out.mkdir(parents=True, exist_ok=True)
    teacher, head, sets, _ = teacher_reference(cfg)
    chance = 1 / len(cfg.classes)
    out_file = args.out / "open_vocab.json"
    setup = {"config": str(args.config), "classes": cfg.classes, "held_out": args.held_out, "chance": chance, "models": MODELS,
             "feature_weight": args.feature_weight, "overrides": args.set}
    runs = []
    if out_file.is_file():  # seeds already measured with the same setup are kept, not re-run (a resumed or extended run)
        before = json.loads(out_file.read_text())
        if {k: before.get(k) for k in setup} != setup:
            raise SystemExit(f"{out_file} holds runs of another setup ({ {k: before.get(k) for k in setup} }): choose another --out")
        runs = before["runs"]
    for seed in args.seeds:
        if any(r["seed"] == seed for r in runs):
            print(f"seed {seed}: already in {out_file}, kept")
            continue
        runs.append(run_seed(cfg, seed, args.held_out, args.feature_weight, args.work or args.out / "work", teacher, head, sets, print,
                             ["teacher", *args.models, "embedding_added"]))
        result = {**setup, "seeds": [r["seed"] for r in runs], "summary": summarise(runs, chance), "runs": runs}
        out_file.write_text(json.dumps(result, indent=2))  # after every seed: an interrupted run keeps its numbers
    s = summarise(runs, chance)
    closed = s.get("embedding_all_minus_logit_all_mean")
    print(f"added by name ({', '.join(args.held_out)}): transfer {s['embedding_added']['added_transfer']['mean_over_domains']:.2f} "
          f"(student {s['embedding_added']['added_top1']['mean_over_domains']['mean']:.3f}, "
          f"teacher {s['teacher']['added_top1']['mean_over_domains']['mean']:.3f}, "
          f"chance {chance:.3f})" + (f"; closed vocabulary, embedding - logit student: {closed['mean']:+.3f}" if closed else ""))
    print(f"wrote {args.out / 'open_vocab.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
