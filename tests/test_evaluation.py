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
