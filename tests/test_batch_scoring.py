"""The scoring loop of predict, evaluate and demo, called from Python."""

import copy

import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import NotFittedError

from skprotoad import ProtoADDetector
from skprotoad.batch_scoring import score_and_write

from .conftest import TINY


@pytest.fixture()
def files(synthetic, tmp_path):
    """Four test images as PNG files."""
    paths = []
    for i, image in enumerate(synthetic.X_test[:4]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.asarray(image * 255, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("kwargs, message", [
    # NaN called every image normal; +inf too
    ({"threshold": float("nan")}, "threshold must be finite"),
    ({"threshold": float("inf")}, "threshold must be finite"),
    # each image's overlay replaced the one before, all listed as overlays/a.png
    ({"names": ["a", "b", "A", "c"], "out_dir": "OUT"}, r"names must differ.*\['A', 'a'\]"),
    # a TypeError and an IndexError after some files were written
    ({"out_dir": "OUT"}, r"out_dir needs names.*\(4\), got none"),
    ({"names": ["a", "b"], "out_dir": "OUT"}, r"out_dir needs names.*\(4\), got 2"),
    ({"truth_masks": [np.zeros((4, 4), bool)]}, "truth_masks must have one entry per item"),
])
def test_bad_arguments_are_refused_before_any_image_is_read(kwargs, message, tiny_detector,
                                                            files, tmp_path):
    if "out_dir" in kwargs:
        kwargs = {**kwargs, "out_dir": tmp_path / "out"}
    with pytest.raises(ValueError, match=message):
        score_and_write(tiny_detector, files, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"sigma": 2.0}, {"device": "banana"}])
def test_a_model_problem_is_raised_not_taken_for_every_images(change, tiny_detector, files):
    """Every image was skipped with the model's message and the run returned
    nothing, without an error."""
    detector = copy.deepcopy(tiny_detector).set_params(**change)
    with pytest.raises(ValueError, match=list(change)[0]):
        score_and_write(detector, files)


def test_an_unfitted_model_is_refused(files):
    with pytest.raises(NotFittedError):  # was an AttributeError on offset_
        score_and_write(ProtoADDetector(**TINY), files)


def test_strict_names_the_image_by_its_index_in_the_input(tiny_detector, files, tmp_path):
    """The error named the image by its place in its batch (X[1] for the 6th)."""
    detector = copy.deepcopy(tiny_detector).set_params(batch_size=4)
    items = files + [files[0], str(tmp_path / "missing.png"), files[1]]
    with pytest.raises(ValueError, match=r"^image 5: .*missing\.png"):
        score_and_write(detector, items, strict=True)
    result = score_and_write(detector, items)
    assert result["skipped"][0][0] == 5 and result["index"].tolist() == [0, 1, 2, 3, 4, 6]
