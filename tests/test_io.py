import json

import numpy as np
import pytest

from dfkd_assets.core.io import MANIFEST_NAME, SHARD_NAME, ShardError, atomic_write_bytes, encode_png, read_shard, write_shard


def make(tmp_path, n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    items = [(f"{i:03d}.png", encode_png(im)) for i, im in enumerate(images)]
    records = [{"index": i} for i in range(n)]
    return images, write_shard(tmp_path, items, records, {"class": "dog"})


def test_shard_round_trip_and_manifest(tmp_path):
    images, manifest = make(tmp_path)
    back, m = read_shard(tmp_path)
    np.testing.assert_array_equal(back, images)
    assert m["count"] == 3 and all(len(r["sha256"]) == 64 for r in m["images"])
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["shard_sha256"] == manifest["shard_sha256"]


def test_shard_bytes_are_deterministic(tmp_path):
    make(tmp_path / "a")
    make(tmp_path / "b")
    assert (tmp_path / "a" / SHARD_NAME).read_bytes() == (tmp_path / "b" / SHARD_NAME).read_bytes()


def test_tampered_manifest_is_detected(tmp_path):
    make(tmp_path)
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    m["images"][1]["sha256"] = "0" * 64
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ShardError, match="001.png"):
        read_shard(tmp_path)


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="manifest"):
        read_shard(tmp_path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    class Boom(bytes):
        pass

    with pytest.raises(TypeError):
        atomic_write_bytes(p, object())  # fails while writing
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]
