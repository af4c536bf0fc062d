"""Evaluation and prediction reports: the files, what they show, no overwrite."""

import base64
import re

import numpy as np
import pytest
from PIL import Image

from skprotoad.metrics import evaluate_maps
from skprotoad.report import evaluation_report, prediction_report

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(12, int), np.ones(8, int)]
    masks = np.zeros((20, 32, 32), dtype=bool)
    masks[12:, 10:16, 12:20] = True
    maps = rng.random((20, 32, 32)).astype(np.float32) * 0.5
    maps[masks] += rng.random(masks.sum()).astype(np.float32) * 0.8
    scores = maps.max(axis=(1, 2))
    types = ["good"] * 12 + ["crack"] * 4 + ["hole"] * 4
    return labels, scores, masks, maps, types


def _drawer(calls):
    def draw(i):
        calls.append(int(i))
        image = np.zeros((24, 40, 3), dtype=np.uint8)
        image[..., 0] = 10 * i  # each example tells which image it is
        return image
    return draw


def _embedded_pngs(page):
    return [base64.b64decode(m) for m in re.findall(r"base64,([A-Za-z0-9+/=]+)'", page)]


def test_evaluation_report_files_and_numbers(case, tmp_path):
    labels, scores, masks, maps, types = case
    threshold = float(np.sort(scores[labels == 0])[-2])  # one normal image above it
    calls = []
    paths = evaluation_report(tmp_path, labels, scores, threshold, defect_types=types,
                              masks=masks, maps=maps, draw_example=_drawer(calls))
    assert set(paths) == {"index", "scores", "roc", "pro", "false_alarms"} | (
        {"misses"} if (scores[labels == 1] <= threshold).any() else set())
    for name, path in paths.items():
        if name != "index":
            with Image.open(path) as img:
                assert img.format == "PNG" and img.width > 200 and img.height > 150
    page = paths["index"].read_text()
    # self-contained: every figure written is also embedded in the page
    assert len(_embedded_pngs(page)) == len(paths) - 1
    assert "src='scores.png'" not in page and "http" not in page
    # the numbers on the page are the measured ones
    metrics = evaluate_maps(labels, scores, masks, maps)
    assert f"{metrics['image_auroc']:.4f}" in page and f"{metrics['aupro']:.4f}" in page
    assert "8.3% (1 of 12)" in page  # the one false alarm
    assert "<td>crack</td><td>4</td>" in page and "<td>hole</td><td>4</td>" in page
    # the false-alarm grid shows the normal image above the threshold, first
    worst = int(np.flatnonzero(labels == 0)[np.argmax(scores[labels == 0])])
    assert calls[0] == worst


def test_evaluation_report_without_maps_or_misses(case, tmp_path):
    labels, scores, _, _, _ = case
    threshold = float(scores.min()) - 1.0  # everything flagged: no miss, all alarms
    paths = evaluation_report(tmp_path, labels, scores, threshold,
                              draw_example=_drawer([]), n_examples=3)
    assert "pro" not in paths and "misses" not in paths
    page = paths["index"].read_text()
    assert "No defective image is below the threshold." in page
    with Image.open(paths["false_alarms"]) as img:  # 3 examples in one row
        assert img.width > 3 * 40


def test_reports_never_replace_files_without_asking(case, tmp_path):
    labels, scores, _, _, _ = case
    evaluation_report(tmp_path, labels, scores, 0.5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="scores.png exists; pass overwrite=True"):
        evaluation_report(tmp_path, labels, scores, 0.6)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    evaluation_report(tmp_path, labels, scores, 0.6, overwrite=True)
    assert (tmp_path / "index.html").read_bytes() != before["index.html"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(y_true=[0, 0, 0]), "normal .0. and defective"),
    (dict(y_true=[0, 2, 1]), "0 .normal. and 1"),
    (dict(scores=[0.1, np.nan, 0.3]), "scores must be finite"),
    (dict(scores=[0.1, 0.2]), "2 values for 3 images"),
    (dict(threshold=np.inf), "threshold must be finite"),
    (dict(masks=np.zeros((3, 4, 4), bool)), "masks and maps together"),
])
def test_evaluation_report_refuses_bad_input(kwargs, match, tmp_path):
    args = {**dict(y_true=[0, 1, 0], scores=[0.1, 0.9, 0.2], threshold=0.5), **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluation_report(tmp_path, args.pop("y_true"), args.pop("scores"),
                          args.pop("threshold"), **args)
    assert not any(tmp_path.iterdir())


def test_prediction_report_shows_the_most_anomalous_images(tmp_path):
    scores = np.array([0.2, 0.9, 0.1, 0.7, 0.95, 0.3])
    calls = []
    paths = prediction_report(tmp_path, scores, threshold=0.5, names=list("abcdef"),
                              draw_example=_drawer(calls), n_examples=3)
    assert calls == [4, 1, 3]  # by decreasing score
    page = paths["index"].read_text()
    assert "50.0% (3)" in page and len(_embedded_pngs(page)) == 2
    with Image.open(paths["contact_sheet"]) as sheet:
        assert sheet.width >= 3 * 40


def test_every_file_written_is_announced(case, tmp_path):
    """Callers check EVALUATION_FILES and PREDICTION_FILES before any work
    (evaluate --report): a report file missing from them would be replaced
    unchecked, or fail after the work."""
    from skprotoad.report import EVALUATION_FILES, PREDICTION_FILES

    labels, scores, masks, maps, types = case
    scores = scores.copy()
    scores[0], scores[-1] = 2.0, -1.0  # a normal image above and a defective one below
    threshold = float(np.median(scores))
    written = evaluation_report(tmp_path / "e", labels, scores, threshold, defect_types=types,
                                masks=masks, maps=maps, draw_example=_drawer([]))
    assert {p.name for p in written.values()} == set(EVALUATION_FILES)
    written = prediction_report(tmp_path / "p", scores, threshold, draw_example=_drawer([]))
    assert {p.name for p in written.values()} == set(PREDICTION_FILES)


def test_names_undecodable_in_the_locale_are_written_as_their_bytes(case, tmp_path):
    """Under LC_ALL=C a data set named "été" reaches the title as surrogates
    ("\\udcc3\\udca9t\\udcc3\\udca9"): encoding the page failed after the work."""
    labels, scores, _, _, _ = case
    paths = evaluation_report(tmp_path, labels, scores, 0.5, title="\udcc3\udca9t\udcc3\udca9")
    assert "<h1>été</h1>".encode() in paths["index"].read_bytes()


_Y, _S = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.35, 0.3, 0.9])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(names=["a"]), ValueError, r"names has 1 values for 5 images"),
    (dict(defect_types=["good", "crack"]), ValueError, r"defect_types has 2 values for 5 images"),
    (dict(names="abcde"), TypeError, "names must be a sequence of one str per image"),
    (dict(defect_types=3), TypeError, "defect_types must be a sequence of one str per image"),
    # 0 wrote "No normal image is above the threshold." beside a false alarm
    (dict(n_examples=0), ValueError, "n_examples must be at least 1, got 0"),
    (dict(n_examples=-2), ValueError, "n_examples must be at least 1, got -2"),
    (dict(n_examples=2.5), TypeError, "n_examples must be an int"),
])
def test_evaluation_report_refuses_bad_per_image_input(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        evaluation_report(tmp_path, _Y, _S, 0.25, draw_example=_drawer([]), **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(names=["a", "b"]), ValueError, r"names has 2 values for 5 images"),
    (dict(n_examples=0), ValueError, "n_examples must be at least 1, got 0"),
])
def test_prediction_report_refuses_bad_per_image_input(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        prediction_report(tmp_path, _S, 0.25, draw_example=_drawer([]), **kwargs)
    assert not any(tmp_path.iterdir())


def test_overwrite_removes_what_an_earlier_report_wrote_and_this_one_does_not(tmp_path):
    """A false_alarms.png left by an earlier report contradicts a page that says
    there is no false alarm; files that are not the report's own stay."""
    masks = np.zeros((5, 8, 8), dtype=bool)
    masks[3:, 2:5, 2:5] = True
    maps = masks + 0.1 * np.arange(5)[:, None, None]
    first = evaluation_report(tmp_path, _Y, _S, 0.32, masks=masks, maps=maps,
                              draw_example=_drawer([]))
    assert {"pro", "false_alarms", "misses"} <= set(first)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "contact_sheet.png").write_bytes(b"not the evaluation report's")
    (tmp_path / "sub").mkdir()
    # no false alarm at 0.5 and no masks: no false_alarms.png, no pro.png
    second = evaluation_report(tmp_path, _Y, _S, 0.5, draw_example=_drawer([]), overwrite=True)
    assert "No normal image is above the threshold." in second["index"].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "contact_sheet.png", "index.html", "misses.png", "notes.txt", "roc.png", "scores.png",
        "sub"]

    folder = tmp_path / "p"
    prediction_report(folder, _S, 0.25, draw_example=_drawer([]))
    prediction_report(folder, _S, 0.25, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "scores.png"]
