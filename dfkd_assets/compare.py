"""`dfkd compare`: the prompt-diversification methods side by side, same budget, several seeds.

For every (method, seed) this builds the prompt bank, synthesises the same number of images per
class with the same synthesis settings, distils a fresh student and evaluates it on the
configured evaluation sets. Two references use the same image budget:
  noopt  decoded random VQGAN latents, no CLIP guidance (the generator prior alone; a baseline,
         not a control: a VQ decoder trained on the world already yields world-like images)
  real   KD on real world images (toyworld renders of every domain): the upper reference
It runs core/ directly (no Dagster runs, no registry moves): an experiment, not a deployment.
Synthesis batches are kept under OUT/work/, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dfkd_assets.config import DfkdConfig, class_key, load_config

METHODS = ["vanilla", "mix", "random", "contrastive"]
BASELINES = ["noopt", "real"]


def _variant(cfg: DfkdConfig, method: str, seed: int) -> DfkdConfig:
    d = cfg.model_dump(mode="python")
    d["prompts"].update(method=method if method in METHODS else "vanilla", seed=seed)
    d["synthesis"].update(seed=seed)
    if method == "noopt":
        d["synthesis"].update(iterations=0)
    d["distill"].update(seed=seed)
    d["student"].update(init_seed=seed)
    return DfkdConfig.model_validate(d)


def _synthesis_fingerprint(v: DfkdConfig, method: str, seed: int) -> str:
    """Everything that determines the synthetic images (not the distillation settings)."""
    import hashlib

    from dfkd_assets.defs.fingerprints import SCHEDULING_ONLY

    dump = v.model_dump(mode="json", exclude={"synthesis": SCHEDULING_ONLY - {"batch_size", "log_every"}})
    parts = {k: dump[k] for k in ("classes", "teacher", "generator", "prompts", "synthesis")}
    return hashlib.sha256(json.dumps({"method": method, "seed": seed, **parts}, sort_keys=True).encode()).hexdigest()[:16]


def run_one(cfg: DfkdConfig, method: str, seed: int, work: Path, teacher, head, sets, log) -> dict:
    import torch

    from dfkd_assets.core.distill import distill
    from dfkd_assets.core.evaluation import evaluate
    from dfkd_assets.core.prompts import build_bank
    from dfkd_assets.core.seeding import derive_seed
    from dfkd_assets.core.student import build_student
    from dfkd_assets.core.synthesis import synthesize_resumable
    from dfkd_assets.loaders import distill_settings, generator_for, style_settings, synthesis_settings

    v = _variant(cfg, method, seed)
    device = head.device
    n = v.synthesis.images_per_class
    t0 = time.perf_counter()
    if method == "real":
        from dfkd_assets.toyworld import world

        rng = np.random.default_rng([seed, 99])
        imgs, labels = [], []
        for k, c in enumerate(v.classes):
            for i in range(n):
                dom = world.DOMAINS[rng.integers(len(world.DOMAINS))]
                imgs.append(world.render(c, dom, list(world.COLOURS)[rng.integers(len(world.COLOURS))], rng, v.synthesis.image_size))
                labels.append(k)
        images = np.stack(imgs)
    else:
        bank, _ = build_bank(teacher, v.classes, v.prompts.method, style_settings(v), v.prompts.vanilla_template)
        vqgan = generator_for(v, device)
        sset = synthesis_settings(v, device)
        parts, labels = [], []
        for k, c in enumerate(v.classes):
            styles = bank.assignments(c, n)
            targets = torch.stack([bank.features[s, k] for s in styles]).to(device)
            seeds = [derive_seed(v.synthesis.seed, c, i) for i in range(n)]
            fp = _synthesis_fingerprint(v, method, seed)
            ims = synthesize_resumable(vqgan, teacher, head, targets, seeds, sset, v.synthesis.batch_size, work / f"{method}_s{seed}" / class_key(c), fp).images
            parts.append(ims)
            labels += [k] * n
        images = np.concatenate(parts)
    t_syn = time.perf_counter() - t0
    student = build_student(v.student.arch, v.classes, v.student.input_size, v.student.init_seed)
    distill(student, teacher, head, torch.from_numpy(images), torch.tensor(labels), distill_settings(v, device),
            checkpoint_dir=work / f"{method}_s{seed}" / "student", fingerprint=f"{method}-{seed}-{v.config_hash()}")
    t_kd = time.perf_counter() - t0 - t_syn
    res = evaluate({"student": student.to(device).eval()}, sets, len(v.classes), max(v.student.input_size, teacher.image_size),
                   v.evaluation.batch_size, device)["student"]
    log(f"{method:12s} seed {seed}: mean {res.mean_top1:.3f} " + " ".join(f"{d} {a:.2f}" for d, a in res.top1.items())
        + f"  (synthesis {t_syn:.0f} s, distillation {t_kd:.0f} s)")
    return {"method": method, "seed": seed, "top1": res.top1, "mean": res.mean_top1, "synthesis_s": t_syn, "distill_s": t_kd,
            "grid": np.concatenate([images[k * n : k * n + 8] for k in range(len(v.classes))])}


def compare(cfg: DfkdConfig, methods: list[str], seeds: list[int], out: Path, log=print) -> dict:
    import torch

    from dfkd_assets.core.evaluation import evaluate
    from dfkd_assets.core.report import write_grid
    from dfkd_assets.core.teacher import teacher_logits, zero_shot_head
    from dfkd_assets.loaders import device_for, eval_sets, teacher_for

    out.mkdir(parents=True, exist_ok=True)
    device = device_for(cfg)
    teacher = teacher_for(cfg, device)
    head = zero_shot_head(teacher, cfg.classes, cfg.teacher.templates)
    sets = [s for group in eval_sets(cfg).values() for s in group]
    teacher_res = evaluate({"t": lambda x: teacher_logits(teacher, head, x)}, sets, len(cfg.classes), teacher.image_size, cfg.evaluation.batch_size, device)["t"]
    log("teacher zero-shot: " + " ".join(f"{d} {a:.2f}" for d, a in teacher_res.top1.items()))
    runs = []
    result: dict = {}
    for s in seeds:  # seeds outer: an interrupted comparison still has every method
        for m in methods:
            r = run_one(cfg, m, s, out / "work", teacher, head, sets, log)
            if s == seeds[0]:
                write_grid(out / f"samples_{m}.png", r["grid"], cols=8)
            r.pop("grid")
            runs.append(r)
            result = _summarize(cfg, runs, teacher_res, seeds, out)  # after every run: an interrupted comparison keeps its table
    log("\n" + (out / "compare.md").read_text())
    return result


def _summarize(cfg: DfkdConfig, runs: list[dict], teacher_res, seeds: list[int], out: Path) -> dict:
    from dfkd_assets.core.evaluation import transfer_ratio
    from dfkd_assets.core.report import markdown_table

    domains = list(teacher_res.top1)
    chance = 1 / len(cfg.classes)
    rows = [{"method": "teacher (zero-shot)", **{d: f"{teacher_res.top1[d]:.3f}" for d in domains}, "mean": f"{teacher_res.mean_top1:.3f}"}]
    summary = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        per = {d: (float(np.mean([r["top1"][d] for r in rs])), float(np.std([r["top1"][d] for r in rs]))) for d in domains}
        mean = (float(np.mean([r["mean"] for r in rs])), float(np.std([r["mean"] for r in rs])))
        tr = float(np.nanmean([transfer_ratio(per[d][0], teacher_res.top1[d], chance) for d in domains]))
        summary[m] = {"per_domain": per, "mean": mean, "mean_transfer_ratio": tr, "seeds": [r["seed"] for r in rs],
                      "synthesis_s": float(np.mean([r["synthesis_s"] for r in rs])), "distill_s": float(np.mean([r["distill_s"] for r in rs]))}
        rows.append({"method": f"{m} (n={len(rs)})", **{d: f"{per[d][0]:.3f} ± {per[d][1]:.3f}" for d in domains},
                     "mean": f"{mean[0]:.3f} ± {mean[1]:.3f}", "transfer": f"{tr:.2f}"})
    rows.append({"method": "chance", **{d: f"{chance:.3f}" for d in domains}, "mean": f"{chance:.3f}"})
    table = markdown_table(rows, ["method", *domains, "mean", "transfer"])
    result = {"teacher": teacher_res.top1, "chance": chance, "seeds": seeds, "runs": runs, "summary": summary,
              "budget": {"images_per_class": cfg.synthesis.images_per_class, "iterations": cfg.synthesis.iterations, "cutn": cfg.synthesis.cutn,
                         "student": cfg.student.arch, "epochs": cfg.distill.epochs, "device": cfg.device}}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(table + "\n")
    return result


def main_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="settings YAML (default: $DFKD_CONFIG or configs/demo.yaml)")
    p.add_argument("--methods", nargs="+", default=BASELINES + METHODS, choices=METHODS + BASELINES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("storage/compare"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for this comparison, e.g. --set synthesis.iterations=30 (value parsed as YAML)")


def parse_sets(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'} (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    compare(load_config(args.config, parse_sets(args.set)), args.methods, args.seeds, args.out)
    return 0
