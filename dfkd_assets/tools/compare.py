"""`dfkd compare`: the prompt-diversification methods side by side, same budget, several seeds.

For every (method, seed) this builds the prompt bank, synthesises the same number of images per
class with the same synthesis settings, distils a fresh student and evaluates it on the
configured evaluation sets. Two references use the same image budget:
  noopt  decoded random VQGAN latents, no CLIP guidance (the generator prior alone; a baseline,
         not a control: a VQ decoder trained on the world already yields world-like images)
  real   KD on real world images (toyworld renders of every domain): the upper reference
It calls the same stage functions as the assets (dfkd_assets/stages/), without Dagster runs or
registry moves: an experiment on the product's code, not a deployment. Synthesis batches and KD
checkpoints are kept under OUT/work/ (keyed by the assets' fingerprints), so an interrupted
comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dfkd_assets.config import DfkdConfig, load_config
from dfkd_assets.core.names import class_key

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


def _real_images(v: DfkdConfig, seed: int) -> list[np.ndarray]:
    """The 'real' reference: toyworld renders of every domain, as many per class as synthesis makes."""
    from dfkd_assets.emojiworld.real import real_images_for
    from dfkd_assets.toyworld import world

    if (emoji := real_images_for(v, seed)) is not None:  # world 2: renders of the teacher's members
        return emoji

    rng = np.random.default_rng([seed, 99])
    n = v.synthesis.images_per_class
    per_class = []
    for c in v.classes:
        imgs = []
        for _ in range(n):
            dom = world.DOMAINS[rng.integers(len(world.DOMAINS))]
            imgs.append(world.render(c, dom, list(world.COLOURS)[rng.integers(len(world.COLOURS))], rng, v.synthesis.image_size))
        per_class.append(np.stack(imgs))
    return per_class


def synthesize_classes(v: DfkdConfig, method: str, seed: int, run_dir: Path, teacher, head, round_: int = 0,
                       student=None, student_id: str = "") -> list[np.ndarray]:
    """The training images of every class of variant `v` (uint8 [N,H,W,3] per class, class order): prompt
    bank, then class synthesis resumable under `run_dir/<class key>` (keyed by the class fingerprint,
    so every experiment using the same `run_dir` gets the same images); the `real` reference instead
    renders world images. Round r >= 1 (`operations.images_per_round` more, from the round's seeds) goes
    to `run_dir/round<r>/<class key>-<fingerprint>/`; with `synthesis.student_weight` > 0 it is made against `student`
    (student-aware synthesis), whose `student_id` enters the fingerprint."""
    from dfkd_assets.fingerprints import round_fingerprint
    from dfkd_assets.loaders import generator_for
    from dfkd_assets.stages.prompts import build_prompt_bank
    from dfkd_assets.stages.synthesis import class_plan, synthesize_class

    if method == "real":
        if round_:
            raise ValueError("--rounds needs a synthesis method: the 'real' reference has no rounds")
        return _real_images(v, seed)
    device = head.device
    bank, _ = build_prompt_bank(v, teacher, head)
    vqgan = generator_for(v, device)
    aware = round_ > 0 and v.synthesis.student_weight > 0
    per_class = []
    for c in v.classes:
        fp = round_fingerprint(v, teacher.teacher_id, c, round_, student_id if aware else "")
        work = run_dir / class_key(c) if round_ == 0 else run_dir / f"round{round_}" / f"{class_key(c)}-{fp}"
        per_class.append(synthesize_class(v, class_plan(v, bank, c, round_), bank, vqgan, teacher, head, device, work, fp,
                                          student=student if aware else None).images)
    return per_class


def distill_variant(v: DfkdConfig, teacher, head, per_class: list[np.ndarray], run_dir: Path):
    """A student of variant `v` distilled on `per_class` (head: the teacher's for `v.classes`) by the
    asset's own stages (stages/training.kd_set, distill_student), resumable under `run_dir/student/<fingerprint>`:
    a folder per KD setting and data, so levers may share `run_dir`. Returns (student, whether it resumed
    from a checkpoint: its KD time then is not the training's)."""
    from dfkd_assets.core.distill import CHECKPOINT
    from dfkd_assets.stages.training import distill_student, kd_set

    ks = kd_set(v, teacher.teacher_id, per_class, head.device)
    state = run_dir / "student" / ks.fingerprint
    resumed = (state / CHECKPOINT).exists()
    return distill_student(v, teacher, head, ks.images, ks.labels, head.device, state, ks.fingerprint)[0], resumed


def run_one(cfg: DfkdConfig, method: str, seed: int, work: Path, teacher, head, sets, log, rounds: int = 0) -> dict:
    """One variant at one seed through the product's stages: prompt bank, class synthesis, training set,
    distillation, evaluation (dfkd_assets/stages/). `rounds` > 0: then, as the `retrain` schedule does,
    each round synthesizes `operations.images_per_round` more images per class (against the current
    student when `synthesis.student_weight` > 0) and a fresh student is distilled on the union; the
    last one is evaluated (the round-0 student's mean is recorded beside it)."""
    from dfkd_assets.stages.evaluation import evaluate_models

    v = _variant(cfg, method, seed)
    device = head.device
    run_dir = work / f"{method}_s{seed}"
    t_syn = t_kd = 0.0
    resumed = False
    per_class: list[np.ndarray] = []
    extra: dict = {}
    student = None
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        student_id = _student_id(v, teacher, head, per_class) if r else ""  # the student a student-aware round competes with
        new = synthesize_classes(v, method, seed, run_dir, teacher, head, r, student, student_id)
        per_class = new if r == 0 else [np.concatenate([a, b]) for a, b in zip(per_class, new)]
        t_syn += time.perf_counter() - t0
        t0 = time.perf_counter()
        student, resumed_r = distill_variant(v, teacher, head, per_class, run_dir)
        t_kd += time.perf_counter() - t0
        resumed = resumed or resumed_r
        if r < rounds:
            extra[f"round{r}_mean"] = evaluate_models(v, {"student": student.to(device).eval()}, sets, device,
                                                      max(v.student.input_size, teacher.image_size)).mean["student"]
    res = evaluate_models(v, {"student": student.to(device).eval()}, sets, device, max(v.student.input_size, teacher.image_size))
    top1, mean = res.top1["student"], res.mean["student"]
    log(f"{method:12s} seed {seed}: mean {mean:.3f} " + " ".join(f"{d} {a:.2f}" for d, a in top1.items())
        + "".join(f", {k} {x:.3f}" for k, x in extra.items()) + f"  (synthesis {t_syn:.0f} s, distillation {t_kd:.0f} s)")
    return {"method": method, "seed": seed, "top1": top1, "mean": mean, "synthesis_s": t_syn, "distill_s": t_kd, "distill_resumed": resumed,
            **extra, "grid": np.concatenate([imgs[:8] for imgs in per_class])}


def _student_id(v: DfkdConfig, teacher, head, per_class: list[np.ndarray]) -> str:
    """The fingerprint of the student `distill_variant` trains on `per_class` (settings, teacher, data):
    what a student-aware round was made against."""
    from dfkd_assets.stages.training import kd_set

    return kd_set(v, teacher.teacher_id, per_class, head.device).fingerprint


def teacher_reference(cfg: DfkdConfig, log=print):
    """(teacher, zero-shot head, evaluation sets, the teacher's top-1 per evaluation domain): what every
    run of an experiment is measured against, loaded once."""
    from dfkd_assets.core.teacher import teacher_logits
    from dfkd_assets.loaders import device_for, eval_sets, teacher_for
    from dfkd_assets.stages.evaluation import evaluate_models
    from dfkd_assets.stages.prompts import build_head

    device = device_for(cfg)
    teacher = teacher_for(cfg, device)
    head = build_head(cfg, teacher)
    sets = eval_sets(cfg)
    top1 = evaluate_models(cfg, {"teacher": lambda x: teacher_logits(teacher, head, x)}, sets, device, teacher.image_size).top1["teacher"]
    log("teacher zero-shot: " + " ".join(f"{d} {a:.2f}" for d, a in top1.items()))
    return teacher, head, sets, top1


def compare(cfg: DfkdConfig, methods: list[str], seeds: list[int], out: Path, log=print, work: Path | None = None, rounds: int = 0) -> dict:
    """Every method at every seed (with `rounds` retraining rounds after round 0); `work` (default OUT/work)
    holds the resumable synthesis and KD state: two comparisons that differ only in distillation settings
    share their synthesis through it, and in rounds' settings their round 0."""
    from dfkd_assets.core.report import write_grid

    out.mkdir(parents=True, exist_ok=True)
    teacher, head, sets, teacher_top1 = teacher_reference(cfg, log)
    runs: list[dict] = []
    result: dict = {}
    for s in seeds:  # seeds outer: an interrupted comparison still has every method
        for m in methods:
            r = run_one(cfg, m, s, work or out / "work", teacher, head, sets, log, rounds)
            if s == seeds[0]:
                write_grid(out / f"samples_{m}.png", r.pop("grid"), cols=8)
            r.pop("grid", None)
            runs.append(r)
            result = _write_results(cfg, runs, teacher_top1, seeds, out)  # after every run: an interrupted comparison keeps its table
    log("\n" + (out / "compare.md").read_text())
    return result


def _write_results(cfg: DfkdConfig, runs: list[dict], teacher_top1: dict, seeds: list[int], out: Path) -> dict:
    from dfkd_assets.stages.evaluation import seed_summary

    chance = 1 / len(cfg.classes)
    summary, table = seed_summary(runs, teacher_top1, chance)
    result = {"teacher": teacher_top1, "chance": chance, "seeds": seeds, "runs": runs, "summary": summary,
              "budget": {"images_per_class": cfg.synthesis.images_per_class, "iterations": cfg.synthesis.iterations, "cutn": cfg.synthesis.cutn,
                         "student": cfg.student.arch, "model_kwargs": cfg.student.model_kwargs, "epochs": cfg.distill.epochs, "device": cfg.device}}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(table + "\n")
    return result


def main_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="settings YAML (default: $DFKD_CONFIG or configs/demo.yaml)")
    p.add_argument("--methods", nargs="+", default=BASELINES + METHODS, choices=METHODS + BASELINES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("storage/compare"))
    p.add_argument("--work", type=Path, default=None,
                   help="resumable synthesis/KD state (default OUT/work); share it between comparisons of distillation levers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for this comparison, e.g. --set synthesis.iterations=30 (value parsed as YAML)")
    p.add_argument("--rounds", type=int, default=0,
                   help="retraining rounds after round 0 (operations.images_per_round more images each, a fresh student on the union); "
                   "with --set synthesis.student_weight=W they are student-aware")


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
    compare(load_config(args.config, parse_sets(args.set)), args.methods, args.seeds, args.out, work=args.work, rounds=args.rounds)
    return 0
