"""Issue 37: property tests (hypothesis) for the image loaders and the served model's input contract.

- `core/evaluation.load_image` on any file: a PNG header declaring any size (up to 2^31 - 1 per
  side), real images of every mode in every format the evaluation reads, then truncated or with
  bytes flipped: it returns a uint8 [size, size, 3] array or raises EvalDataError naming the file,
  nothing else; a header over the bounds is refused without decoding.
- `registry_model.check_input` on any array: a float32 [N, 3, H, W] array within the limits or an
  InputContractError, nothing else.

Bounded to run in well under a minute on 2 CPU cores (derandomized: the same examples every run).
"""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from dfkd_assets.core.evaluation import MAX_IMAGE_PIXELS, EvalDataError, load_image

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """What load_image resizes an image to before its centre crop: the shorter side at `size`."""
    s = size / min(w, h)
    return max(size, round(w * s)), max(size, round(h * s))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# valid (colour type, bit depth) pairs of the PNG spec
PNG_MODES = [(0, 1), (0, 8), (0, 16), (2, 8), (2, 16), (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)]


@SETTINGS
@given(w=st.one_of(st.integers(1, 64), st.integers(1, 2**31 - 1)), h=st.one_of(st.integers(1, 64), st.integers(1, 2**31 - 1)),
       mode=st.sampled_from(PNG_MODES), payload=st.binary(max_size=64), size=st.sampled_from([16, 32, 224]))
def test_any_png_header_loads_or_is_refused_by_name_and_oversize_is_never_decoded(tmp_path_factory, w, h, mode, payload, size):
    from PIL import ImageFile

    path = tmp_path_factory.mktemp("png") / "x.png"
    color, depth = mode
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + (_chunk(b"PLTE", b"\0" * 3) if color == 3 else b"")
                     + _chunk(b"IDAT", zlib.compress(payload)) + _chunk(b"IEND", b""))
    rw, rh = resized_size(w, h, size)
    oversize = w * h > MAX_IMAGE_PIXELS or rw * rh > MAX_IMAGE_PIXELS
    decodes = []
    real = ImageFile.ImageFile.load
    ImageFile.ImageFile.load = lambda im: decodes.append(1) or real(im)
    try:
        out = load_image(path, size)
    except EvalDataError as e:
        assert str(path) in str(e)
        if oversize:
            assert ("more than" in str(e) or "too large to decode safely" in str(e)) and not decodes
        return
    finally:
        ImageFile.ImageFile.load = real
    assert not oversize and out.shape == (size, size, 3) and out.dtype == np.uint8


FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff", "WEBP": ".webp"}


@SETTINGS
@given(h=st.integers(1, 40), w=st.integers(1, 40), mode=st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1", "CMYK", "F", "I"]),
       fmt=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**16),
       damage=st.sampled_from(["none", "truncate", "flip", "zero-tail"]), cut=st.floats(0, 1))
def test_any_image_loads_as_rgb_or_fails_naming_the_file(tmp_path_factory, h, w, mode, fmt, seed, damage, cut):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I;16", "I"):
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16 if mode == "I;16" else np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        return
    data = bytearray(buf.getvalue())
    if damage == "truncate":
        data = data[: int(len(data) * cut)]
    elif damage == "flip" and data:
        for i in rng.integers(0, len(data), max(1, len(data) // 50)):
            data[i] ^= 0xFF
    elif damage == "zero-tail":
        start = int(len(data) * cut)
        data[start:] = bytes(len(data) - start)
    path = tmp_path_factory.mktemp("img") / f"x{FORMATS[fmt]}"
    path.write_bytes(bytes(data))
    try:
        out = load_image(path, 24)
    except EvalDataError as e:
        assert str(path) in str(e)
        return
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


LIMITS = {"max_batch": 4, "min_side": 8, "max_side": 64}


@SETTINGS
@given(shape=st.lists(st.integers(0, 80), min_size=0, max_size=5),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.uint8, np.int64, np.bool_]),
       fill=st.sampled_from(["uniform", "nan", "inf", "255", "negative", "one", "zero"]), seed=st.integers(0, 2**16))
def test_any_array_meets_the_contract_or_is_refused(shape, dtype, fill, seed):
    from dfkd_assets.registry_model import InputContractError, check_input

    if int(np.prod(shape)) > 2_000_000:
        return
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    if fill == "nan" and x.size:
        x.flat[rng.integers(0, x.size)] = np.nan
    elif fill == "inf" and x.size:
        x.flat[rng.integers(0, x.size)] = np.inf
    elif fill == "255":
        x = x * 255
    elif fill == "negative":
        x = x - 0.5
    elif fill in ("one", "zero"):
        x = np.full(shape, 1.0 if fill == "one" else 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        x = x.astype(dtype) if dtype is not np.bool_ else x > 0.5
    try:
        out = check_input(x, LIMITS)
    except InputContractError as e:
        assert e.error_code == "INVALID_PARAMETER_VALUE" and "input contract" in str(e)
        return
    n, c, hh, ww = out.shape
    assert out.dtype == np.float32 and c == 3 and 1 <= n <= 4 and 8 <= hh <= 64 and 8 <= ww <= 64
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert np.issubdtype(x.dtype, np.floating)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_input_converts_without_changing_values(dtype):
    from dfkd_assets.registry_model import check_input

    x = np.random.default_rng(0).random((2, 3, 9, 10)).astype(dtype)
    out = check_input(x, LIMITS)
    assert out.dtype == np.float32 and np.allclose(out, x)
