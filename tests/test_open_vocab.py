"""The open-vocabulary student: an embedding student whose classifier is the teacher's
zero-shot text head kept as data, and classes added to a registered one by name, in a new version
with the same weights, evaluated and promoted like any challenger; bad names refused naming the
class, with nothing registered.

The registered student (fixture `reg`) is the CI embedding student fitted to the tiny teacher's
image embeddings of a few probe images, so "the new version predicts the new class" is something
it can get wrong: the class is added by name only, and the probe image the teacher assigns to it
must come out labelled with it.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import make_workspace, pickle_findings, registry_client

NEW = "giraffe"  # the tiny random teacher assigns every probe image to it among [dog, elephant, house, giraffe]


def _probes(n: int = 8) -> torch.Tensor:
    """Smooth random colour fields, 32 px."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)


def _fitted_student(cfg, teacher, steps: int = 40):
    """The CI embedding student, its embedding fitted to the teacher's on the probes (eval mode)."""
    from dfkd_assets.core.distill import feature_loss
    from dfkd_assets.core.student import build_embedding_student
    from dfkd_assets.stages.prompts import build_head

    student = build_embedding_student(cfg.student.arch, cfg.classes, cfg.student.input_size, 0, build_head(cfg, teacher),
                                      teacher.logit_scale, teacher.teacher_id)
    x = _probes()
    with torch.no_grad():
        target = teacher.encode_images(x)
    opt = torch.optim.Adam(student.parameters(), 3e-3)
    for _ in range(steps):
        loss = feature_loss(student.train().embedding(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    with torch.no_grad():
        assert float(feature_loss(student.embedding(x), target)) < 0.01, "precondition: the student's embedding matches the teacher's"
    return student


def _embedding_settings(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["student"]["head"] = "embedding"
    raw["distill"]["feature_weight"] = 1.0
    path.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def reg(tmp_path_factory, teacher):
    """The fitted embedding student registered as student_model registers it, and made champion;
    DAGSTER_HOME points into the workspace; the evaluation set has images of NEW too."""
    from dfkd_assets.config import load_config
    from dfkd_assets.defs.registry import ModelRegistry
    from dfkd_assets.defs.resources import MlflowTracking
    from dfkd_assets.toyworld.evalset import write_eval_set

    root = tmp_path_factory.mktemp("openvocab")
    path = make_workspace(root)
    _embedding_settings(path)
    write_eval_set(root / "eval", [NEW], per_class=3, size=32)
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    cfg = load_config(path)
    tracking = MlflowTracking()
    registry = ModelRegistry(cfg, tracking)
    student = _fitted_student(cfg, teacher)
    tags = {"config_hash": cfg.config_hash(), "teacher_id": teacher.teacher_id, "dvc_hash": "0" * 32, "fingerprint": "f" * 16,
            "prompt_method": cfg.prompts.method, "git_sha": "abc123", "dagster_run_id": "test"}
    with tracking.run(cfg, run_name="open-vocab-test", tags=tags):
        version = registry.register_challenger(student, tags)
    registry.promote(version, None, "test")
    yield SimpleNamespace(cfg=cfg, path=path, registry=registry, name=registry.name, version=version, student=student, root=root)
    mp.undo()


def _versions(reg) -> list[str]:
    return sorted((mv.version for mv in registry_client(reg.cfg).search_model_versions(f"name='{reg.name}'")), key=int)


def _add(reg, *argv) -> int:
    from dfkd_assets.tools.cli import main

    return main(["add-classes", "--config", str(reg.path), *argv])


def test_embedding_student_head_is_data_and_round_trips(teacher, tmp_path):
    """The classifier lives in head.safetensors, not in the weights: a new head leaves model.safetensors
    byte-identical, and its logits are the teacher's text head of the new classes applied to the
    student's embedding. A spec of an embedding student without its head file is refused."""
    from dfkd_assets.core.io import sha256_file
    from dfkd_assets.core.student import HEAD, META, WEIGHTS, EmbeddingStudent, build_embedding_student, load_student, load_student_files
    from dfkd_assets.core.teacher import zero_shot_head

    classes = ["dog", "elephant", "house"]
    student = build_embedding_student("resnet10t", classes, 32, 0, zero_shot_head(teacher, classes, "simple"), teacher.logit_scale, teacher.teacher_id).eval()
    student.save(tmp_path / "a")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "a" / HEAD)) == {"text_embeddings", "logit_scale"}
    assert not any("text_embeddings" in k or "logit_scale" in k for k in load_file(tmp_path / "a" / WEIGHTS))
    spec = json.loads((tmp_path / "a" / META).read_text())
    assert spec["head"] == "embedding" and spec["teacher_id"] == teacher.teacher_id and spec["embed_dim"] == 64
    x = _probes(4)
    loaded = load_student(tmp_path / "a")
    assert isinstance(loaded, EmbeddingStudent) and loaded.classes == classes
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))
        wider = classes + [NEW]
        head = zero_shot_head(teacher, wider, "simple")
        other = student.with_head(wider, head)
        other.save(tmp_path / "b")
        assert sha256_file(tmp_path / "b" / WEIGHTS) == sha256_file(tmp_path / "a" / WEIGHTS)
        assert sha256_file(tmp_path / "b" / HEAD) != sha256_file(tmp_path / "a" / HEAD)
        logits, emb = other.logits_and_embedding(x)
        torch.testing.assert_close(logits, teacher.logit_scale * emb @ head.T)
        torch.testing.assert_close(logits[:, :3], student(x))  # the old classes answer as before
        assert student.classes == classes and student.text_embeddings.shape[0] == 3  # the original is untouched
    with pytest.raises(ValueError, match="embedding student.*head.safetensors"):
        load_student_files(tmp_path / "a" / META, tmp_path / "a" / WEIGHTS)


def test_embedding_student_setting_needs_feature_distillation_and_distils(teacher, tmp_path):
    """`student.head: embedding` without distill.feature_weight is refused by name; with it, the
    distillation stage returns an embedding student carrying the teacher's head of the classes,
    and training pulls its embedding towards the teacher's."""
    from dfkd_assets.config import ConfigError, load_config
    from dfkd_assets.core.distill import feature_loss, resize_batch
    from dfkd_assets.core.student import EmbeddingStudent
    from dfkd_assets.stages.prompts import build_head
    from dfkd_assets.stages.training import distill_student

    path = make_workspace(tmp_path)
    with pytest.raises(ConfigError, match=r"student.head: embedding needs distill.feature_weight > 0"):
        load_config(path, {"student": {"head": "embedding"}})
    cfg = load_config(path, {"student": {"head": "embedding"}, "distill": {"feature_weight": 1.0, "epochs": 4, "batch_size": 8, "lr": 0.05, "augment": False}})
    head = build_head(cfg, teacher)
    g = torch.Generator().manual_seed(1)
    images = (torch.nn.functional.interpolate(torch.rand(16, 3, 4, 4, generator=g), size=32, mode="bilinear") * 255).to(torch.uint8).permute(0, 2, 3, 1)
    labels = torch.arange(16) % 3
    x = resize_batch(images.permute(0, 3, 1, 2), 32)
    with torch.no_grad():
        target = teacher.encode_images(x)
    from dfkd_assets.core.student import build_embedding_student

    fresh = build_embedding_student(cfg.student.arch, cfg.classes, 32, cfg.student.init_seed, head, teacher.logit_scale, teacher.teacher_id).eval()
    student, history = distill_student(cfg, teacher, head, images, labels, torch.device("cpu"), tmp_path / "ckpt", "fp")
    assert isinstance(student, EmbeddingStudent) and student.classes == cfg.classes and student.teacher_id == teacher.teacher_id
    torch.testing.assert_close(student.text_embeddings, head)
    assert len(history) == 4 and np.isfinite(history[-1]["kd_loss"])
    with torch.no_grad():
        before, after = float(feature_loss(fresh.embedding(x), target)), float(feature_loss(student.embedding(x), target))
    assert after < 0.5 * before, (before, after)


def test_add_classes_by_name_registers_a_version_that_predicts_it(reg, teacher):
    """`dfkd add-classes giraffe`: a new version with the champion's weights (same sha256) and a head for
    the four classes, compared with the champion on the three classes both serve and promoted by the
    usual rule (and not promoted were it worse there); served through mlflow.pyfunc (what
    `mlflow models serve` runs) it has a giraffe column, its probabilities are the teacher's text head
    applied to the student's embedding, and it labels the probe the teacher calls a giraffe as one."""
    import mlflow.pyfunc

    from dfkd_assets import artifacts
    from dfkd_assets.core.promotion import promotion_decision
    from dfkd_assets.core.teacher import zero_shot_head
    from dfkd_assets.defs.registry import WEIGHTS_FROM

    x = _probes()
    wider = reg.cfg.classes + [NEW]
    head = zero_shot_head(teacher, wider, reg.cfg.teacher.templates)
    with torch.no_grad():
        teacher_labels = (teacher.encode_images(x) @ head.T).argmax(-1)
    probe = int(torch.nonzero(teacher_labels == 3)[0])  # an image the teacher assigns to the new class
    before = _versions(reg)
    assert _add(reg, "--base", reg.version, NEW) == 0
    after = _versions(reg)
    assert len(after) == len(before) + 1
    new = after[-1]
    client = registry_client(reg.cfg)
    base_tags, tags = client.get_model_version(reg.name, reg.version).tags, client.get_model_version(reg.name, new).tags
    assert tags[WEIGHTS_FROM] == reg.version and tags["weights_sha256"] == base_tags["weights_sha256"]
    assert tags["head_sha256"] != base_tags["head_sha256"] and tags["teacher_id"] == base_tags["teacher_id"]
    assert "evaluated_student_mean_top1" in tags  # evaluated like any challenger ...
    assert client.get_model_version_by_alias(reg.name, "champion").version == new  # ... and promoted
    # compared with the champion on the 3 classes both serve: same weights and the same text rows for
    # them, so there it answers exactly as the champion does
    metrics = artifacts.read_metrics(reg.cfg)
    assert metrics["challenger_version"] == str(new) and metrics["champion_version"] == metrics["champion_seen"] == str(reg.version)
    assert metrics["shared_classes"] == reg.cfg.classes
    assert metrics["student_shared_mean_top1"] == metrics["champion_shared_mean_top1"]
    assert promotion_decision(metrics, "student_mean_top1", 0.01, str(reg.version)).reason.startswith(
        "on the 3 classes both serve (dog, elephant, house): ")
    # the same record with the new version worse on those classes beyond the tolerance: not promoted,
    # however good its score on all four classes
    worse = metrics | {"student_shared_mean_top1": metrics["champion_shared_mean_top1"] - 0.05, "student_mean_top1": 1.0}
    assert not promotion_decision(worse, "student_mean_top1", 0.01, str(reg.version)).promote
    assert f"weights: those of v{reg.version} unchanged" in client.get_model_version(reg.name, new).description

    model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
    frame = model.predict(x.numpy())
    assert list(frame.columns) == ["label", "score", *wider]
    with torch.no_grad():
        want = (teacher.logit_scale * reg.student.embedding(x) @ head.T).softmax(-1).numpy()
    np.testing.assert_allclose(frame[wider].to_numpy(), want, atol=1e-5)
    assert frame["label"][probe] == NEW
    old = mlflow.pyfunc.load_model(f"models:/{reg.name}/{reg.version}").predict(x.numpy())
    assert NEW not in old.columns and old["label"][probe] != NEW  # the base version could not say it


@pytest.mark.parametrize("names, message", [
    (["   "], r"class name '   ' is empty"),
    (["zebra", "Zebra!"], r"class 'Zebra!' is given twice"),
    (["Dog"], r"class 'Dog' collides with the model's existing class 'dog'"),
    (["label"], r"class 'label' collides with the model's output columns"),
])
def test_bad_names_are_refused_naming_the_class(reg, capsys, names, message):
    import re

    before, champion = _versions(reg), registry_client(reg.cfg).get_model_version_by_alias(reg.name, "champion").version
    assert _add(reg, "--base", reg.version, *names) == 2
    assert re.search(message, capsys.readouterr().err)
    assert _versions(reg) == before
    assert registry_client(reg.cfg).get_model_version_by_alias(reg.name, "champion").version == champion


def test_a_name_the_text_tower_cannot_encode_is_refused_and_nothing_registered(reg, capsys):
    """A name whose prompts exceed the text context: the add_classes run fails in student_head, naming
    the class, before anything is logged; the champion stays."""
    long_name = "zebra " + "with very long stripes " * 20
    before, champion = _versions(reg), registry_client(reg.cfg).get_model_version_by_alias(reg.name, "champion").version
    assert _add(reg, "--base", reg.version, long_name) == 1
    err = capsys.readouterr().err
    assert "champion is unchanged" in err and "does not fit the teacher's text encoder" in err and "'zebra with very long stripes" in err
    assert _versions(reg) == before
    assert registry_client(reg.cfg).get_model_version_by_alias(reg.name, "champion").version == champion


def test_a_logit_student_is_refused_saying_what_it_needs(reg, capsys):
    from dfkd_assets.core.student import build_student

    logit = build_student(reg.cfg.student.arch, reg.cfg.classes, reg.cfg.student.input_size, 0).eval()
    with reg.registry.tracking.run(reg.cfg, run_name="logit", tags={}):
        version = reg.registry.register_challenger(logit, {"teacher_id": "t"})
    before = _versions(reg)
    assert _add(reg, "--base", version, "zebra") == 2
    err = capsys.readouterr().err
    assert f"v{version} is a logit student" in err and "student.head: embedding" in err
    assert _versions(reg) == before


def test_tampered_head_is_refused_naming_the_file(reg, tmp_path):
    """The head is covered by the sha256 checks like the weights: changed in the artifact store, it is
    refused by dfkd's loader and by mlflow.pyfunc; the logged model holds no pickle."""
    from urllib.parse import urlparse

    import mlflow.artifacts
    import mlflow.pyfunc

    from dfkd_assets.defs.registry import load_student_model
    from dfkd_assets.registry_model import IntegrityError

    client = registry_client(reg.cfg)
    uri = f"models:/{reg.name}/{reg.version}"
    assert pickle_findings(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))) == []
    stored = Path(urlparse(client.get_model_version_download_uri(reg.name, reg.version)).path)
    head = stored / "artifacts" / "head.safetensors"
    original = head.read_bytes()
    try:
        head.write_bytes(original[:-4] + bytes(b ^ 0x01 for b in original[-4:]))
        with pytest.raises(IntegrityError, match=r"head\.safetensors .*does not match the sha256 recorded in the registry's tags"):
            load_student_model(client, uri)
        with pytest.raises(Exception, match=r"head\.safetensors .*does not match the sha256 recorded in the model's MLmodel"):
            mlflow.pyfunc.load_model(uri)
    finally:
        head.write_bytes(original)
    assert load_student_model(client, uri).classes == reg.cfg.classes


def test_open_vocab_script_runs_end_to_end_sharing_synthesis(tmp_path):
    """scripts/open_vocab_eval.py on the CI models (random, so only the plumbing is measured): per seed,
    one synthesis per class shared by the two students of every class, a separate synthesis of the
    kept classes alone for the student that gets the held-out class by name, three distillations, the numbers consistent with each other."""
    import importlib.util

    from conftest import ROOT

    path = make_workspace(tmp_path, {"classes": ["dog", "elephant", "house", "cat"]})
    spec = importlib.util.spec_from_file_location("open_vocab_eval", ROOT / "scripts" / "open_vocab_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    tiny = ["synthesis.images_per_class=4", "synthesis.iterations=2", "prompts.steps=2", "distill.epochs=1"]
    assert script.main(["--config", str(path), "--seeds", "0", "--held-out", "cat", "--out", str(out), *sum((["--set", s] for s in tiny), [])]) == 0
    result = json.loads((out / "open_vocab.json").read_text())
    work = out / "work" / "contrastive_s0"
    assert sorted(p.name for p in work.iterdir() if p.name != "student") == ["cat", "dog", "elephant", "house"]  # synthesised once
    assert len(list((work / "student").iterdir())) == 2  # logit on all, embedding on all
    kept = out / "work" / "contrastive_s0_without_cat"  # its own bank and synthesis: the held-out name never enters it
    assert sorted(p.name for p in kept.iterdir() if p.name != "student") == ["dog", "elephant", "house"]
    assert len(list((kept / "student").iterdir())) == 1  # the embedding student without `cat`
    run = result["runs"][0]["models"]
    assert set(run) == {"teacher", "logit_all", "embedding_all", "embedding_added"} and result["chance"] == 0.25
    for m, r in run.items():
        assert r["mean"] == pytest.approx(np.mean(list(r["top1"].values())))
        assert all(0 <= r[k][d] <= 1 for k in ("top1", "added_top1", "trained_top1") for d in r["top1"]), m
    s = result["summary"]
    assert s["embedding_all_minus_logit_all_mean"]["per_seed"] == [pytest.approx(run["embedding_all"]["mean"] - run["logit_all"]["mean"])]
    # extended with a seed that trains only the added-by-name student: seed 0 is kept as it was, not re-run
    assert script.main(["--config", str(path), "--seeds", "0", "1", "--held-out", "cat", "--out", str(out), "--models",
                        *sum((["--set", s] for s in tiny), [])]) == 0
    extended = json.loads((out / "open_vocab.json").read_text())
    assert [r["seed"] for r in extended["runs"]] == [0, 1] and extended["runs"][0] == result["runs"][0]
    assert set(extended["runs"][1]["models"]) == {"teacher", "embedding_added"} and not (out / "work" / "contrastive_s1").exists()
    assert extended["summary"]["embedding_added"]["seeds"] == [0, 1] and extended["summary"]["logit_all"]["seeds"] == [0]
    with pytest.raises(SystemExit, match="another setup"):  # runs of other settings are never mixed in
        script.main(["--config", str(path), "--seeds", "2", "--held-out", "elephant", "--out", str(out), *sum((["--set", s] for s in tiny), [])])
