"""Checks of the rounding benchmark's premise (bench_rounding): its float
images are the files' images, moved by the factor only."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_rounding import _float_images, main  # noqa: E402

from skprotoad.preprocessing import model_inputs  # noqa: E402


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 56), (48, 48)]):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        pixels[0, 0] = 255  # a saturated pixel: the factor above 1 must not push it out
        path = tmp_path / f"{i}.png"
        image = Image.fromarray(pixels)
        if i == 0:  # stored sideways, shown upright by its EXIF orientation
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(path, exif=exif)
        else:
            image.save(path)
        paths.append(path)
    return paths


def _batches(images):
    return np.concatenate([b.numpy() for _, b in model_inputs(images, 32, None, 8)])


def test_float_images_at_factor_one_are_the_files(image_files):
    floats = _float_images(image_files, 1.0)
    assert floats[0].shape == (56, 40, 3)  # turned as the detector turns the file
    np.testing.assert_allclose(_batches(floats), _batches(image_files), rtol=0, atol=1e-6)


def test_a_factor_moves_the_inputs_by_rounding_only(image_files):
    reference = _batches(image_files)
    moved = _batches(_float_images(image_files, 1 - 1.1e-6))
    assert not np.array_equal(moved, reference)
    np.testing.assert_allclose(moved, reference, rtol=0, atol=1e-4)
    assert max(float(a.max()) for a in _float_images(image_files, 1 + 1.1e-6)) == 1.0


def test_factors_far_from_one_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--factors", "1.01", "--out", str(tmp_path)])
