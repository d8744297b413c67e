import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_assets.core.evaluation import EvalDataError, evaluate, load_image, scan_domainbed
from dfkd_assets.toyworld.evalset import write_eval_set

CLASSES = ["dog", "hot dog", "house"]


def test_scan_maps_folders_and_evaluates(tmp_path):
    write_eval_set(tmp_path, CLASSES, per_class=2, size=24)
    sets = scan_domainbed(tmp_path, CLASSES)
    assert [s.domain for s in sets] == ["photo", "sketch"] and len(sets[0].paths) == 6
    label_of = {p: y for s in sets for p, y in zip(s.paths, s.labels)}

    def oracle(x):  # perfect predictor keyed on the batch order
        return torch.nn.functional.one_hot(torch.tensor(oracle.labels[: len(x)]), 3).float()

    first = sets[0]
    oracle.labels = first.labels
    res = evaluate({"o": oracle, "const": lambda x: torch.tensor([[1.0, 0, 0]]).repeat(len(x), 1)}, [first], 3, 24, 64, torch.device("cpu"))
    assert res["o"].top1["photo"] == 1.0
    assert res["const"].top1["photo"] == pytest.approx(1 / 3)
    assert res["const"].confusion["photo"][:, 0].sum() == 6
    assert all(y in (0, 1, 2) for y in label_of.values())


def test_unknown_folder_and_missing_class_are_errors(tmp_path):
    write_eval_set(tmp_path, CLASSES, per_class=1, size=16)
    (tmp_path / "photo" / "giraffe").mkdir()
    with pytest.raises(EvalDataError, match="giraffe.*class_map"):
        scan_domainbed(tmp_path, CLASSES)
    ok = scan_domainbed(tmp_path, CLASSES, class_map={"giraffe": "house"})  # a mapped folder is accepted
    assert sum(len(s.paths) for s in ok) == 6


def test_missing_class_in_domain(tmp_path):
    write_eval_set(tmp_path, CLASSES, per_class=1, size=16)
    with pytest.raises(EvalDataError, match="no images for classes \\['tree'\\]"):
        scan_domainbed(tmp_path, CLASSES + ["tree"])


def test_missing_root_and_domain(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        scan_domainbed(tmp_path / "nope", CLASSES)
    write_eval_set(tmp_path, CLASSES, per_class=1, size=16)
    with pytest.raises(EvalDataError, match="domains \\['art'\\] not found"):
        scan_domainbed(tmp_path, CLASSES, domains=["art"])


def test_load_image_handles_modes_and_corruption(tmp_path):
    Image.fromarray(np.zeros((10, 30), dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    Image.new("CMYK", (20, 40)).save(tmp_path / "c.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"")
    assert load_image(tmp_path / "g.png", 16).shape == (16, 16, 3)
    assert load_image(tmp_path / "c.jpg", 16).shape == (16, 16, 3)
    with pytest.raises(EvalDataError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", 16)


def _benchmark_tree(root, domains, folders, ext=".jpg"):
    """Files in the layout the benchmark is distributed in: root/<domain>/<class folder>/<images>."""
    for d in domains:
        for i, f in enumerate(folders):
            (root / d / f).mkdir(parents=True)
            for j in range(2):
                Image.fromarray(np.full((12, 20, 3), (10 * i + j) % 256, np.uint8)).save(root / d / f / f"{f}_{j:04d}{ext}")


@pytest.mark.parametrize(
    "preset, classes, folder_of",
    [
        ("pacs", ["dog", "elephant", "house"], None),
        ("vlcs", ["bird", "chair", "person"], None),
        ("officehome", ["alarm clock", "exit sign", "tv"], {"alarm clock": "Alarm_Clock", "exit sign": "Exit_Sign", "tv": "TV"}),
        ("imageclef", ["aeroplane", "dog", "people"], {"aeroplane": "0", "dog": "7", "people": "11"}),
        ("visda2017", ["aeroplane", "knife", "truck"], None),
    ],
)
def test_benchmark_presets_read_their_published_layouts(tmp_path, preset, classes, folder_of):
    from dfkd_assets.config import load_config
    from dfkd_assets.core.datasets import PRESETS
    from dfkd_assets.loaders import eval_sets

    p = PRESETS[preset]
    inverse = {v: k for k, v in p.folders.items()}
    if preset == "officehome":  # DomainBed's folder names: Alarm_Clock, Exit_Sign, TV
        folders = ["TV" if c == "tv" else "_".join(w.capitalize() for w in c.split()) for c in p.classes]
    else:
        folders = [inverse.get(c, c) for c in p.classes]
    _benchmark_tree(tmp_path, p.domains, folders)
    (tmp_path / p.domains[0] / "image_list.txt").write_text("a list file next to the class folders is ignored\n")
    ds = {"name": preset, "root": str(tmp_path), "preset": preset}
    with pytest.raises(EvalDataError, match="matches no class.*other_classes: skip"):
        eval_sets(load_config("configs/ci.yaml", {"classes": classes, "evaluation": {"datasets": [ds]}}))
    cfg = load_config("configs/ci.yaml", {"classes": classes, "evaluation": {"datasets": [{**ds, "other_classes": "skip"}]}})
    sets = eval_sets(cfg)[preset]
    assert [s.domain for s in sets] == list(p.domains)
    for s in sets:
        assert len(s.paths) == 2 * len(classes)
        for path, y in zip(s.paths, s.labels):  # each image carries the label of the prompt its folder maps to
            expected = (folder_of or {}).get(classes[y], classes[y])
            assert path.parent.name == expected


def test_class_in_config_but_not_in_benchmark_is_named(tmp_path):
    from dfkd_assets.config import load_config
    from dfkd_assets.core.datasets import PRESETS
    from dfkd_assets.loaders import eval_sets

    _benchmark_tree(tmp_path, PRESETS["pacs"].domains, PRESETS["pacs"].classes)
    ds = {"name": "pacs", "root": str(tmp_path), "preset": "pacs", "other_classes": "skip"}
    with pytest.raises(EvalDataError, match="no images for classes \\['zebra'\\]"):
        eval_sets(load_config("configs/ci.yaml", {"classes": ["dog", "zebra"], "evaluation": {"datasets": [ds]}}))


def test_a_champion_for_another_class_list_is_scored_on_the_shared_classes_only():
    """Champion classes in another order and with a class the challenger lacks: its columns are mapped
    by name into the challenger's order and every non-shared column is -inf for both models."""
    from dfkd_assets.stages.evaluation import champion_predictors, shared_classes

    classes, theirs = ["dog", "elephant", "house"], ["house", "dog", "cat"]
    assert shared_classes(classes, theirs) == ["dog", "house"]
    student = lambda x: torch.tensor([[0.0, 5.0, 2.0]]).repeat(len(x), 1)  # noqa: E731 (full argmax: elephant)
    champion = lambda x: torch.tensor([[1.0, 3.0, 9.0]]).repeat(len(x), 1)  # noqa: E731 house, dog, cat (full argmax: cat)
    p = champion_predictors(classes, student, champion, theirs)
    assert sorted(p) == ["champion@shared", "student@shared"]
    x = torch.zeros(2, 3, 8, 8)
    inf = float("-inf")
    assert p["student@shared"](x).tolist() == [[0.0, inf, 2.0]] * 2
    assert p["champion@shared"](x).tolist() == [[3.0, inf, 1.0]] * 2  # dog <- its column 1, house <- its column 0
    same = champion_predictors(classes, student, champion, classes)
    assert same == {"champion": champion}  # the same class list: compared on every class, as before


def test_shared_top1_counts_only_the_shared_classes_images():
    from dfkd_assets.stages.evaluation import shared_top1

    a = np.array([[4, 1, 0], [9, 9, 9], [1, 0, 3]])  # row 1 (a class the champion lacks) is left out
    b = np.array([[2, 0, 0], [0, 5, 0], [0, 0, 2]])
    assert shared_top1({"x/a": a, "x/b": b}, [0, 2]) == pytest.approx(((4 + 3) / 9 + 1.0) / 2)


def test_helper_predictors_become_shared_scores_and_leave_the_tables(tmp_path):
    """One evaluation pass with the helpers; afterwards the models, confusions and metrics.json are the
    real models' plus the shared-class record, and the restricted top-1 differs from the full one."""
    from dfkd_assets.stages.evaluation import Evaluation, champion_predictors, compare_on_shared, metrics_record, report_markdown

    classes, theirs = ["dog", "elephant", "house"], ["house", "dog"]
    write_eval_set(tmp_path, classes, per_class=2, size=16)
    student = lambda x: torch.tensor([[0.0, 5.0, 2.0]]).repeat(len(x), 1)  # noqa: E731 always elephant; house among the shared
    champion = lambda x: torch.tensor([[1.0, 3.0]]).repeat(len(x), 1)  # noqa: E731 always dog
    predictors = {"student": student, "teacher": student, **champion_predictors(classes, student, champion, theirs)}
    res = evaluate(predictors, scan_domainbed(tmp_path, classes), 3, 16, 8, torch.device("cpu"))
    ev = Evaluation({m: r.top1 for m, r in res.items()}, res["student"].counts, 1 / 3, {m: r.confusion for m, r in res.items()})
    ev = compare_on_shared(ev, classes, theirs)
    assert ev.models == ["student", "teacher"] and sorted(ev.confusion) == ["student", "teacher"]
    assert ev.mean["student"] == pytest.approx(1 / 3)  # full classes: right on the elephants only
    assert ev.shared_classes == ["dog", "house"] and ev.shared_top1 == {"student": 0.5, "champion": 0.5}
    rec = metrics_record(ev, "2", "1", "1")
    assert rec["shared_classes"] == ["dog", "house"] and rec["champion_version"] == "1"
    assert rec["student_shared_mean_top1"] == rec["champion_shared_mean_top1"] == 0.5
    assert not any(k.startswith("champion_mean") or "@" in k for k in rec)
    assert "compared on the 2 classes both serve (dog, house)" in report_markdown(ev, "t", "teacher", "h", [("photo", "c.png")], "1")
