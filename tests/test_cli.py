"""The command line, run in-process through ``skprotoad.cli.main``."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image

from skprotoad.cli import main
from skprotoad.cli_files import output_names

# The random resnet18 of conftest.TINY as command-line options.
TINY_OPTIONS = [
    "--backbone", "resnet18", "--weights", "none", "--layers", "1", "2",
    "--image-size", "64", "--crop-size", "64", "--clustering", "kmeans",
    "--n-clusters", "16", "--n-farthest", "0", "--batch-size", "8", "--seed", "0", "--normalization", "patch",
]
# Sizes (height, width) of the test images: non-square ones included, so that
# outputs must follow each image's own size.
TEST_SIZES = [(64, 64), (48, 80), (90, 60), (64, 64), (40, 64)]


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _resized(array, size):
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("images")
    for i, image in enumerate(synthetic.X_train):
        _save(image, root / "train" / f"good_{i:02d}.png")
    for i, size in enumerate(TEST_SIZES):
        _save(_resized(synthetic.X_test[i], size), root / "test" / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def model(folders):
    path = folders / "model.joblib"
    assert main(["fit", str(folders / "train"), "-o", str(path), "-q", *TINY_OPTIONS]) == 0
    return path


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- help


def test_help_as_a_module_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "skprotoad", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for word in ("fit", "predict", "evaluate", "demo", "examples", "exit codes"):
        assert word in done.stdout


@pytest.mark.parametrize("command", ["fit", "predict", "evaluate", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0 and "examples:" in out and "exit codes" in out


def test_usage_errors_exit_with_2(capsys):
    code, _, err = _run(["fit"], capsys)
    assert code == 2 and "usage" in err
    code, _, err = _run(["predict", "m.joblib", "x.png", "-o", "out", "--threshold", "abc"], capsys)
    assert code == 2


# ------------------------------------------------------------ fit, predict


def test_fit_writes_a_fitted_detector(model):
    detector = joblib.load(model)
    assert detector.n_train_images_ == 12 and detector.backbone == "resnet18"
    assert detector.verbose is False  # no progress bars when used from Python later


def test_fit_passes_normalization_and_image_score(folders, tmp_path, capsys):
    argv = ["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS,
            "--image-score", "cosine", "--normalization", "image"]
    assert _run(argv, capsys)[0] == 0
    network = joblib.load(tmp_path / "m.joblib").network_
    assert network.embedding.normalization == "image" and network.image_score == "cosine"
    code, _, err = _run([*argv[:-1], "layer"], capsys)
    assert code == 2 and "invalid choice" in err


def test_fit_passes_map_metric(folders, tmp_path, capsys):
    argv = ["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS,
            "--normalization", "image", "--map-metric", "euclidean"]
    assert _run(argv, capsys)[0] == 0
    detector = joblib.load(tmp_path / "m.joblib")
    assert detector.map_metric == "euclidean" and detector.network_.whitened_channels == 0
    code, _, err = _run([*argv[:-1], "mahalanobis"], capsys)
    assert code == 2 and "invalid choice" in err


def test_fit_passes_n_farthest(folders, tmp_path, capsys):
    argv = ["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS,
            "--n-farthest", "3"]
    assert _run(argv, capsys)[0] == 0
    detector = joblib.load(tmp_path / "m.joblib")
    assert detector.n_farthest == 3 and detector.prototypes_.shape[0] == 16 + 3
    code, _, err = _run([*argv[:-1], "-2"], capsys)
    assert code == 2 and "--n-farthest" in err


def test_predict_with_split_image_scores(folders, tmp_path, capsys):
    """normalization="image" with its default image_score="projection": image
    scores and labels from that readout, masks from the maps and their own
    threshold, empty exactly for the images labelled normal."""
    model = tmp_path / "m.joblib"
    argv = ["fit", folders / "train", "-o", model, "-q", *TINY_OPTIONS,
            "--normalization", "image"]
    assert _run(argv, capsys)[0] == 0
    detector = joblib.load(model)
    assert detector.network_.image_score == "projection"
    out = tmp_path / "out"
    assert _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)[0] == 0
    rows = _read_csv(out / "scores.csv")
    paths = [r["path"] for r in rows]
    np.testing.assert_allclose(
        [float(r["score"]) for r in rows], -detector.score_samples(paths), rtol=1e-6
    )
    labels = np.array([-1 if r["label"] == "anomaly" else 1 for r in rows])
    np.testing.assert_array_equal(labels, detector.predict(paths))
    run = json.loads((out / "run.json").read_text())
    assert run["threshold"] == pytest.approx(-detector.offset_)
    assert run["pixel_threshold"] == pytest.approx(detector.pixel_threshold_)
    assert run["pixel_threshold"] != pytest.approx(run["threshold"])
    expected = detector.predict_masks(paths, output="input")
    for row, mask in zip(rows, expected):
        with Image.open(out / row["mask"]) as img:
            written = np.asarray(img) > 127
        # the same pixels, up to the interpolation of the map to the image's size
        assert np.mean(written == mask) > 0.98
        # and exactly: a mask for every image labelled anomalous, none otherwise
        assert written.any() == (row["label"] == "anomaly")


def test_predict_round_trip(model, folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)
    assert code == 0
    assert "5 images scored" in stdout
    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "score", "label", "width", "height", "overlay", "mask"]
    paths = sorted(str(p) for p in (folders / "test").glob("*.png"))
    assert [r["path"] for r in rows] == paths

    detector = joblib.load(model)
    expected = detector.predict(paths)
    labels = np.array([-1 if r["label"] == "anomaly" else 1 for r in rows])
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(
        [float(r["score"]) for r in rows], -detector.score_samples(paths), rtol=1e-6
    )
    run = json.loads((out / "run.json").read_text())
    assert run["threshold"] == pytest.approx(-detector.offset_)
    assert run["pixel_threshold"] == pytest.approx(detector.pixel_threshold_)
    assert not (out / "skipped.csv").exists()


def test_outputs_have_each_images_own_size(model, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)[0] == 0
    for row in _read_csv(out / "scores.csv"):
        with Image.open(row["path"]) as img:
            size = img.size  # (width, height)
        assert (int(row["width"]), int(row["height"])) == size
        with Image.open(out / row["overlay"]) as overlay:
            # small images' overlays are enlarged by a whole factor, to be read
            factor = max(1, -(-256 // min(size)))
            assert overlay.size == (size[0] * factor, size[1] * factor)
            assert overlay.mode == "RGB"
        with Image.open(out / row["mask"]) as mask:
            assert mask.size == size and mask.mode == "L"
            assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_threshold_option_sets_labels_and_masks(model, folders, tmp_path, capsys):
    high, low = tmp_path / "high", tmp_path / "low"
    assert _run(["predict", model, folders / "test", "-o", high, "-q", "--threshold", "5"],
                capsys)[0] == 0
    assert _run(["predict", model, folders / "test", "-o", low, "-q", "--threshold", "-1"],
                capsys)[0] == 0
    assert {r["label"] for r in _read_csv(high / "scores.csv")} == {"normal"}
    assert {r["label"] for r in _read_csv(low / "scores.csv")} == {"anomaly"}
    for mask in (high / "masks").glob("*.png"):
        assert not np.asarray(Image.open(mask)).any()


def test_progress_bars_unless_quiet(model, folders, tmp_path, capsys):
    _, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "a"], capsys)
    assert "predict" in err
    _, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "b", "-q"], capsys)
    assert err == ""


# ------------------------------------------------------- skipping, naming


def test_non_image_and_unreadable_files_are_skipped_and_reported(
    model, folders, tmp_path, capsys, synthetic
):
    mixed = tmp_path / "mixed"
    _save(synthetic.X_test[0], mixed / "ok.png")
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "fake.png").write_text("not a png either")
    # A valid header but truncated pixel data: only decoding finds out.
    full = _save(synthetic.X_test[1], tmp_path / "full.png").read_bytes()
    (mixed / "truncated.png").write_bytes(full[: len(full) // 2])
    out = tmp_path / "out"
    code, _, err = _run(["predict", model, mixed, "-o", out, "-q"], capsys)
    assert code == 0
    for name in ("notes.txt", "fake.png", "truncated.png"):
        assert name in err
    assert [r["path"] for r in _read_csv(out / "scores.csv")] == [str(mixed / "ok.png")]
    skipped = {r["path"]: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert set(skipped) == {str(mixed / n) for n in ("notes.txt", "fake.png", "truncated.png")}


def test_fit_skips_non_image_files(folders, tmp_path, capsys):
    train = tmp_path / "train"
    for p in sorted((folders / "train").glob("*.png"))[:6]:
        (train / p.name).parent.mkdir(exist_ok=True)
        (train / p.name).write_bytes(p.read_bytes())
    (train / "README.md").write_text("normal images")
    code, _, err = _run(["fit", train, "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS], capsys)
    assert code == 0 and "README.md" in err
    assert joblib.load(tmp_path / "m.joblib").n_train_images_ == 6


def test_same_stems_from_different_folders_do_not_overwrite(model, folders, tmp_path, capsys,
                                                            synthetic):
    a = _save(synthetic.X_test[0], tmp_path / "a" / "x.png")
    b = _save(synthetic.X_test[1], tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    assert _run(["predict", model, a, b, "-o", out, "-q"], capsys)[0] == 0
    rows = _read_csv(out / "scores.csv")
    assert [r["overlay"] for r in rows] == ["overlays/a_x.png", "overlays/b_x.png"]
    assert len(list((out / "masks").glob("*.png"))) == 2


def test_output_names_are_distinct():
    names = output_names(["a/x.png", "b/x.png", "a/x.jpg", "c/y.png", "d/a_x.png", "e/Y.png"])
    assert len({n.casefold() for n in names}) == len(names)
    assert names[3] == "c_y" and names[5] == "e_Y"  # y and Y collide on some file systems
    assert output_names(["p/q.png"]) == ["q"]


# ------------------------------------------------------------ error paths


def test_missing_paths_are_usage_errors(model, tmp_path, capsys):
    code, _, err = _run(["predict", model, tmp_path / "nope", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "no such file or folder" in err and "Traceback" not in err
    code, _, err = _run(["predict", tmp_path / "none.joblib", tmp_path, "-o", tmp_path / "o"],
                        capsys)
    assert code == 2 and "no such model file" in err
    code, _, err = _run(["fit", tmp_path / "nope", "-o", tmp_path / "m.joblib"], capsys)
    assert code == 2 and "nope" in err


def test_unreadable_model_is_a_runtime_failure(folders, tmp_path, capsys):
    broken = tmp_path / "broken.joblib"
    broken.write_text("garbage")
    code, _, err = _run(["predict", broken, folders / "test", "-o", tmp_path / "o"], capsys)
    assert code == 1 and "cannot load model" in err
    joblib.dump({"not": "a detector"}, tmp_path / "dict.joblib")
    code, _, err = _run(["predict", tmp_path / "dict.joblib", folders / "test", "-o",
                         tmp_path / "o"], capsys)
    assert code == 1 and "not a ProtoADDetector" in err


def test_library_errors_are_one_clean_line(folders, tmp_path, capsys):
    # more clusters than the training images have patches: the detector's
    # ValueError during the fit (k-means without a number of clusters, which
    # was the example here, is now a usage error found before the fit)
    code, _, err = _run(["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q",
                         *TINY_OPTIONS, "--n-clusters", "100000"], capsys)
    assert code == 1
    assert err.startswith("skprotoad: error: ") and err.count("\n") == 1
    assert "n_clusters" in err and "Traceback" not in err
    assert not (tmp_path / "m.joblib").exists()


def test_folder_without_images_fails(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, err = _run(["fit", tmp_path / "empty", "-o", tmp_path / "m.joblib", "-q"], capsys)
    assert code == 1 and "no readable image files" in err and "sub-folders" in err


# ----------------------------------------------------------- no overwrite


def test_model_is_not_overwritten_without_force(folders, model, capsys):
    before = model.read_bytes()
    code, _, err = _run(["fit", folders / "train", "-o", model, "-q", *TINY_OPTIONS], capsys)
    assert code == 2 and "--force" in err
    assert model.read_bytes() == before


def test_force_overwrites_the_model(folders, tmp_path, capsys):
    path = tmp_path / "m.joblib"
    path.write_text("old")
    argv = ["fit", folders / "train", "-o", path, "-q", "--force", *TINY_OPTIONS]
    assert _run(argv, capsys)[0] == 0
    assert joblib.load(path).n_train_images_ == 12
    assert [p.name for p in tmp_path.iterdir()] == ["m.joblib"]  # no temporary file left
    # Written with the permissions of any new file, not the temporary file's 0600.
    reference = tmp_path / "reference"
    reference.write_text("")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_out_dir_is_not_overwritten_without_force(model, folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)[0] == 0
    code, _, err = _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)
    assert code == 2 and "not empty" in err and "--force" in err

    stale = out / "overlays" / "img_4.png"  # written by the first run
    assert stale.exists()
    (out / "keep_me.txt").write_text("user file")
    one = sorted((folders / "test").glob("*.png"))[0]
    assert _run(["predict", model, one, "-o", out, "-q", "--force"], capsys)[0] == 0
    assert len(_read_csv(out / "scores.csv")) == 1
    # the earlier run's overlays are gone (they would mislead), nothing else is
    assert not stale.exists() and [p.name for p in (out / "overlays").iterdir()] == ["img_0.png"]
    assert (out / "keep_me.txt").read_text() == "user file"


def test_force_never_deletes_or_replaces_files_it_did_not_write(model, folders, tmp_path,
                                                                capsys, synthetic):
    """--force deleted every *.png in OUT/overlays and OUT/masks: a user's own
    masks, or the input images themselves before they were read."""
    out = tmp_path / "out"
    truth = _save(synthetic.masks_test[0].astype(np.uint8) * 255, out / "masks" / "truth_0.png")
    own_image = _save(synthetic.X_test[1], out / "overlays" / "photo.png")
    before = truth.read_bytes(), own_image.read_bytes()
    code, _, err = _run(["predict", model, folders / "test", "-o", out, "-q", "--force"], capsys)
    assert code == 0, err
    assert (truth.read_bytes(), own_image.read_bytes()) == before
    assert (out / "overlays" / "img_0.png").exists()
    # again, scoring the user's image inside OUT/overlays: the earlier run's
    # outputs are replaced, the user's files are still not touched
    code, _, err = _run(["predict", model, own_image, folders / "test", "-o", out, "-q",
                         "--force"], capsys)
    # overlays/photo.png would be this run's overlay of photo.png: refused, named
    assert code == 2 and "did not write" in err and "overlays/photo.png" in err
    assert (truth.read_bytes(), own_image.read_bytes()) == before
    assert (out / "overlays" / "img_0.png").exists()  # the refused run removed nothing
    # a user's scores.csv is not replaced either
    other = tmp_path / "other"
    (other / "scores.csv").parent.mkdir()
    (other / "scores.csv").write_text("my own table")
    code, _, err = _run(["predict", model, folders / "test", "-o", other, "-q", "--force"],
                        capsys)
    assert code == 2 and "scores.csv" in err
    assert (other / "scores.csv").read_text() == "my own table"


def test_an_edited_manifest_cannot_make_force_delete_other_files(model, folders, tmp_path,
                                                                 capsys):
    out = tmp_path / "out"
    assert _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / "notes.png").write_text("keep")
    manifest = json.loads((out / ".skprotoad-outputs.json").read_text())
    manifest["files"] += ["../victim.txt", "notes.png", "overlays/../../victim.txt"]
    (out / ".skprotoad-outputs.json").write_text(json.dumps(manifest))
    assert _run(["predict", model, folders / "test", "-o", out, "-q", "--force"], capsys)[0] == 0
    assert victim.read_text() == "keep" and (out / "notes.png").read_text() == "keep"


# ---------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def fake_mvtec(tmp_path_factory, synthetic):
    """A one-category MVTec AD tree: 12 good training images, 4 good and 4 defect tests."""
    root = tmp_path_factory.mktemp("mvtec")
    cat = root / "widget"
    for i, image in enumerate(synthetic.X_train):
        _save(image, cat / "train" / "good" / f"{i:03d}.png")
    defects = np.flatnonzero(synthetic.y_test == 1)[:4]
    normals = np.flatnonzero(synthetic.y_test == 0)[:4]
    for k, i in enumerate(normals):
        _save(synthetic.X_test[i], cat / "test" / "good" / f"{k:03d}.png")
    for k, i in enumerate(defects):
        _save(synthetic.X_test[i], cat / "test" / "scratch" / f"{k:03d}.png")
        mask = synthetic.masks_test[i].astype(np.uint8) * 255
        _save(mask, cat / "ground_truth" / "scratch" / f"{k:03d}_mask.png")
    return root


def test_evaluate_writes_json(fake_mvtec, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["evaluate", fake_mvtec, "--category", "widget", "-o", out, "-q", *TINY_OPTIONS]
    code, stdout, _ = _run(argv, capsys)
    assert code == 0
    for label in ("image AUROC", "pixel AUROC", "AUPRO@0.3", "image F1-max", "pixel F1-max",
                  "fit time (s)", "test images/s"):
        assert label in stdout
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {
        "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"
    }
    assert {"dataset", "detector", "fit_seconds", "test_images_per_second"} <= set(results)
    assert results["dataset"]["n_test"] == 8 and results["dataset"]["n_test_anomalous"] == 4
    assert results["detector"]["backbone"] == "resnet18"
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())

    # The same no-overwrite rule as the model and output folder.
    code, _, err = _run(argv, capsys)
    assert code == 2 and "--force" in err
    assert _run([*argv, "--force"], capsys)[0] == 0


def test_export_writes_the_whole_pipeline(model, folders, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    out = tmp_path / "station.onnx"
    code, stdout, err = _run(["export", model, "-o", out, "-q"], capsys)
    assert code == 0, err
    detector = joblib.load(model)
    assert f"threshold {-detector.offset_:.4g}" in stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["maps", "scores", "anomalous", "masks"]
    path = sorted((folders / "test").glob("*.png"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    _, scores, flagged, _ = session.run(None, {"images": image[None]})
    assert scores[0] == pytest.approx(-detector.score_samples([str(path)])[0], abs=1e-4)
    assert bool(flagged[0]) == (detector.predict([str(path)])[0] == -1)
    # never overwritten without --force; TorchScript by the extension; the network alone
    code, _, err = _run(["export", model, "-o", out, "-q"], capsys)
    assert code == 2 and "--force" in err
    assert _run(["export", model, "-o", tmp_path / "s.pt", "-q"], capsys)[0] == 0
    assert _run(["export", model, "-o", out, "-q", "--force", "--network-only"], capsys)[0] == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["maps", "scores"]


def test_evaluate_report(fake_mvtec, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    out = tmp_path / "results.json"
    argv = ["evaluate", fake_mvtec, "--category", "widget", "-q", "-o", out, "--report", report,
            *TINY_OPTIONS]
    assert _run(argv, capsys)[0] == 0
    page = (report / "index.html").read_text()
    assert "skprotoad evaluation: widget" in page and "<td>scratch</td><td>4</td>" in page
    results = json.loads(out.read_text())
    assert f"{results['metrics']['image_auroc']:.4f}" in page
    for name in ("scores", "roc", "pro"):
        with Image.open(report / f"{name}.png") as img:
            assert img.format == "PNG" and img.width > 200
    # the example grids show the test images at the overlay size, with outlines
    grids = [p for p in (report / "false_alarms.png", report / "misses.png") if p.exists()]
    for path in grids:
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        assert (pixels == (0, 255, 255)).all(axis=1).any() or "misses" in path.name
    # no overwrite without --force, before any work
    before = (report / "index.html").read_bytes()
    code, _, err = _run(argv[:5] + argv[7:], capsys)  # without -o: only the report is in the way
    assert code == 2 and "report" in err and "--force" in err
    assert (report / "index.html").read_bytes() == before


def test_predict_report(model, folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert _run(["predict", model, folders / "test", "-o", out, "-q", "--report"], capsys)[0] == 0
    page = (out / "report" / "index.html").read_text()
    rows = _read_csv(out / "scores.csv")
    flagged = sum(r["label"] == "anomaly" for r in rows)
    assert f"({flagged})" in page
    with Image.open(out / "report" / "contact_sheet.png") as sheet:
        assert sheet.width > 256
    # run again with --force: the report is the run's own output, replaced
    assert _run(["predict", model, folders / "test", "-o", out, "-q", "--report", "--force"],
                capsys)[0] == 0


def test_report_without_matplotlib_is_a_usage_error(model, folders, tmp_path, capsys,
                                                    monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    code, _, err = _run(["predict", model, folders / "test", "-o", out, "-q", "--report"], capsys)
    assert code == 2 and "skprotoad[report]" in err
    assert not out.exists()


def test_evaluate_category_folder_and_missing_root(fake_mvtec, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(fake_mvtec / "widget")  # the category folder as "."
    code, stdout, _ = _run(["evaluate", ".", "-q", *TINY_OPTIONS], capsys)
    assert code == 0 and "image AUROC" in stdout and stdout.startswith("widget: ")
    monkeypatch.undo()
    code, _, err = _run(["evaluate", tmp_path / "nope", "-q"], capsys)
    assert code == 2 and "nope" in err
    code, _, err = _run(["evaluate", fake_mvtec, "--category", "gadget", "-q"], capsys)
    # an input path that is not there: a usage error, listing the categories
    assert code == 2 and "widget" in err


# -------------------------------------------------------------------- demo


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "-o", out, "-q", "--n-train", "12", "--n-test", "6", "--size", "64",
            "--clustering", "kmeans", "--n-clusters", "16"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "image AUROC" in stdout and "pixel AUROC" in stdout and "AUPRO" in stdout
    assert (out / "grid.png").is_file()
    overlays = sorted((out / "overlays").glob("*.png"))
    assert overlays and all(Image.open(p).size == (256, 256) for p in overlays)
    # both outlines, in their own colours: cyan the model's, green the truth's
    pixels = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3) for p in overlays])
    assert (pixels == (0, 255, 0)).all(axis=1).any()
    assert (pixels == (0, 255, 255)).all(axis=1).any()
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) >= {"image_auroc", "pixel_auroc", "aupro"}
    assert len(_read_csv(out / "scores.csv")) == 6

    # README's first command, run again: the demo replaces its own output,
    # including files of an earlier run that this one does not write
    (out / "overlays" / "test_099_defect.png").write_bytes(b"")
    manifest = json.loads((out / ".skprotoad-outputs.json").read_text())
    manifest["files"].append("overlays/test_099_defect.png")
    (out / ".skprotoad-outputs.json").write_text(json.dumps(manifest))
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert not (out / "overlays" / "test_099_defect.png").exists()
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == [p.name for p in overlays]

    # a folder with files the demo did not write needs --force, and keeps them
    (out / "mine.txt").write_text("mine")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "not empty" in err and "mine.txt" in err
    assert _run([*argv, "--force"], capsys)[0] == 0
    assert (out / "mine.txt").read_text() == "mine"


# ------------------------------------------------------------- bad input


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (no pixel data)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


_BAD_FILES = {
    "huge.png": lambda p, ok: _png_header_only(p, 20000, 20000),
    "deep.png": lambda p, ok: Image.fromarray(np.zeros((8, 8), np.uint16)).save(p),
    "float.tiff": lambda p, ok: Image.fromarray(np.zeros((8, 8), np.float32)).save(p),
    "clear.png": lambda p, ok: Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(p),
    "cut.png": lambda p, ok: p.write_bytes(ok.read_bytes()[:300]),
    "fake.png": lambda p, ok: p.write_text("not an image"),
    "notes.txt": lambda p, ok: p.write_text("not an image"),
}


@pytest.mark.parametrize(
    "command, bad, code, message",
    [
        # fit: header problems are skipped and reported, the fit goes on ...
        ("fit", "huge.png", 0, "too large to decode safely"),
        ("fit", "deep.png", 0, "16-bit or float"),
        ("fit", "float.tiff", 0, "16-bit or float"),
        ("fit", "fake.png", 0, "cannot identify image"),
        ("fit", "notes.txt", 0, "not an image file"),
        # ... what only decoding finds stops it, naming the file
        ("fit", "clear.png", 1, r"clear.png\) is a RGBA image with transparent pixels"),
        ("fit", "cut.png", 1, "cannot read image .*cut.png"),
        # predict skips them all, lists them in skipped.csv, scores the rest
        ("predict", "huge.png", 0, "too large to decode safely"),
        ("predict", "deep.png", 0, "16-bit or float"),
        ("predict", "clear.png", 0, "transparent pixels"),
        ("predict", "cut.png", 0, "truncated"),
        ("predict", "fake.png", 0, "cannot identify image"),
    ],
)
def test_bad_image_files(command, bad, code, message, folders, model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good = sorted((folders / "train").glob("*.png"))[:6]
    for p in good:
        (images / p.name).write_bytes(p.read_bytes())
    _BAD_FILES[bad](images / bad, good[0])
    if command == "fit":
        argv = ["fit", images, "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS]
    else:
        argv = ["predict", model, images, "-o", tmp_path / "out", "-q"]
    got, _, err = _run(argv, capsys)
    assert got == code, err
    assert "Traceback" not in err and bad in err
    assert re.search(message, err), err
    if command == "predict":
        skipped = _read_csv(tmp_path / "out" / "skipped.csv")
        assert [r["path"] for r in skipped] == [str(images / bad)]
        assert len(_read_csv(tmp_path / "out" / "scores.csv")) == len(good)
    elif code == 0:
        assert joblib.load(tmp_path / "m.joblib").n_train_images_ == len(good)
    else:
        assert err.startswith("skprotoad: error: ") and not (tmp_path / "m.joblib").exists()


@pytest.mark.parametrize(
    "options, message, expected",
    [
        (["--layers", "2", "1"], "strictly increasing", 1),
        (["--layers", "1", "1"], "without repeats", 1),
        (["--layers", "1", "9"], "out of range", 1),
        (["--backbone", "no_such_net"], "Unknown backbone", 1),
        (["--backbone", "vit_tiny_patch16_224"], "cannot process 64 x 64 crops", 1),
        (["--n-clusters", "100000"], "more than the .* training patches", 1),
        (["--weights", "/no/such/weights.pth"], "no such file", 1),
        # wrong whatever the data or the backbone: usage errors
        (["--crop-size", "100"], "larger than image_size", 2),
        (["--neighborhood-size", "2"], "neighborhood_size", 2),
        (["--contamination", "0.9"], "contamination", 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_detector_options_are_one_clean_line(options, message, expected, folders, tmp_path,
                                                 capsys):
    argv = ["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q", *TINY_OPTIONS, *options]
    code, _, err = _run(argv, capsys)
    assert code == expected and err.startswith("skprotoad: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "m.joblib").exists()


def test_predict_refuses_bad_runtime_options_and_unfitted_models(model, folders, tmp_path, capsys):
    from skprotoad import ProtoADDetector

    code, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "o", "-q",
                         "--device", "tpu"], capsys)
    assert code == 2 and "device must be" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    joblib.dump(ProtoADDetector(), tmp_path / "unfitted.joblib")
    code, _, err = _run(["predict", tmp_path / "unfitted.joblib", folders / "test", "-o",
                         tmp_path / "o", "-q"], capsys)
    assert code == 1 and "not fitted" in err


def test_unexpected_errors_are_one_clean_line(folders, tmp_path, capsys, monkeypatch):
    from skprotoad import cli

    def broken(*args, **kwargs):
        raise KeyError("something internal")

    monkeypatch.setattr(cli, "_make_detector", broken)
    code, _, err = _run(["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q"], capsys)
    assert code == 1 and "unexpected KeyError" in err and "--debug" in err
    assert "Traceback" not in err


# ------------------------------------------------ issue 17: reliability


def test_fit_and_predict_with_the_safe_format(folders, model, tmp_path, capsys):
    """predict model.safetensors failed with "Error -3 while decompressing data"."""
    from skprotoad import persistence

    safe = tmp_path / "m.safetensors"
    argv = ["fit", folders / "train", "-o", safe, "-q", *TINY_OPTIONS]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    detector = persistence.load(safe)  # the safe format, not a pickle
    assert detector.verbose is False
    np.testing.assert_allclose(
        detector.score_samples(sorted(str(p) for p in (folders / "test").glob("*.png"))),
        joblib.load(model).score_samples(sorted(str(p) for p in (folders / "test").glob("*.png"))),
        rtol=1e-6,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["predict", safe, folders / "test", "-o", a, "-q"], capsys)[0] == 0
    # by content too: a safetensors file under another name is never unpickled
    renamed = tmp_path / "m.model"
    renamed.write_bytes(safe.read_bytes())
    assert _run(["predict", renamed, folders / "test", "-o", b, "-q"], capsys)[0] == 0
    assert _read_csv(a / "scores.csv") == _read_csv(b / "scores.csv")
    # a pickle named .safetensors is refused, not unpickled
    pickled = tmp_path / "p.safetensors"
    pickled.write_bytes(model.read_bytes())
    code, _, err = _run(["predict", pickled, folders / "test", "-o", tmp_path / "c", "-q"], capsys)
    assert code == 1 and "not a valid skprotoad model file" in err


def test_files_that_are_not_models_are_named_as_such(folders, model, tmp_path, capsys):
    # cut inside a pickle frame or between frames: the unpickler raises
    # UnpicklingError or EOFError, and both are reported as a truncated file
    for size in (1000, 100, 50_000):
        truncated = tmp_path / f"cut{size}.joblib"
        truncated.write_bytes(model.read_bytes()[:size])
        code, _, err = _run(["predict", truncated, folders / "test", "-o", tmp_path / f"o{size}"],
                            capsys)
        assert code == 1 and "not a skprotoad model" in err and "truncated" in err, (size, err)
        assert ".safetensors" in err  # says which formats are accepted
    # a text file and random bytes: no unpickler jargon ("Memo value not found", "191")
    for name, content in (("notes.joblib", b"hello\n"),
                          ("noise.joblib", bytes(range(191, 256)) * 3)):
        (tmp_path / name).write_bytes(content)
        code, _, err = _run(["predict", tmp_path / name, folders / "test", "-o",
                             tmp_path / f"o_{name}"], capsys)
        assert code == 1 and "not a skprotoad model" in err and "joblib can read" in err, err
        assert "Memo" not in err and "(191)" not in err


def test_unwritable_outputs_are_refused_before_any_work(folders, tmp_path, capsys,
                                                        monkeypatch, fake_mvtec):
    """An unwritable MODEL was found only after the whole fit, and the error
    named an internal temporary file."""
    from skprotoad import cli

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(cli, "_fit", no_fit)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("")
    # /sys refuses new files even to root (a read-only file system here)
    targets = [a_file / "m.joblib", "/sys/m.joblib"] if os.access("/sys", os.F_OK) else [
        a_file / "m.joblib"]
    for target in targets:
        code, _, err = _run(["fit", folders / "train", "-o", target, "-q", *TINY_OPTIONS], capsys)
        assert code == 2 and f"cannot write model file {target}" in err and ".tmp" not in err
        code, _, err = _run(["evaluate", fake_mvtec, "--category", "widget", "-q",
                             "--save-model", target, *TINY_OPTIONS], capsys)
        assert code == 2 and f"cannot write model file {target}" in err
    code, _, err = _run(["demo", "-o", a_file / "out", "-q"], capsys)
    assert code == 2 and "not a folder" in err


def test_nan_threshold_and_nan_models_never_label_normal(model, folders, tmp_path, capsys):
    for option in ("--threshold", "--vmin", "--vmax"):
        code, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "o", "-q",
                             option, "nan"], capsys)
        assert code == 2 and "finite" in err
    code, _, err = _run(["fit", folders / "train", "-o", tmp_path / "m.joblib", "-q",
                         *TINY_OPTIONS, "--sigma", "1e300"], capsys)
    assert code == 2 and "sigma must be in" in err and "unexpected" not in err

    broken = joblib.load(model)
    broken.network_.prototype_conv.weight.data[0, 0] = float("nan")
    joblib.dump(broken, tmp_path / "nan.joblib")
    code, _, err = _run(["predict", tmp_path / "nan.joblib", folders / "test", "-o",
                         tmp_path / "o", "-q"], capsys)
    assert code == 1 and "non-finite" in err
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_colour_range_and_alpha_are_usage_errors(model, folders, tmp_path, capsys):
    for options, message in ((["--vmin", "2", "--vmax", "1"], "--vmin (2) must be below --vmax (1)"),
                             (["--alpha", "1.5"], "--alpha must be in [0, 1]")):
        code, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "o", "-q",
                             *options], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_non_finite_scores_are_skipped_not_normal(model, folders, tmp_path, capsys, monkeypatch):
    """Should a model still give NaN scores (the load checks passed), predict
    lists those images as skipped, never as normal."""
    from skprotoad import ProtoADDetector

    original = ProtoADDetector.anomaly_maps

    def nan_scores(self, X, output="crop", return_scores=False):
        maps, scores = original(self, X, output=output, return_scores=True)
        scores[:] = np.nan
        return (maps, scores) if return_scores else maps

    monkeypatch.setattr(ProtoADDetector, "anomaly_maps", nan_scores)
    code, _, err = _run(["predict", model, folders / "test", "-o", tmp_path / "o", "-q"], capsys)
    assert code == 1 and "no image could be scored" in err
    assert _read_csv(tmp_path / "o" / "scores.csv") == []
    reasons = {r["reason"] for r in _read_csv(tmp_path / "o" / "skipped.csv")}
    assert reasons == {"its anomaly score is not finite: the model or the image is broken"}


def test_large_images_are_refused_or_drawn_smaller(model, folders, tmp_path, capsys,
                                                   monkeypatch, synthetic):
    """One accepted 178-megapixel image took 17 GB: overlays and masks were
    drawn at its own size. The limits are lowered here to test on small images."""
    from skprotoad import batch_scoring

    big = _save(_resized(synthetic.X_test[0], (120, 200)), tmp_path / "in" / "big.png")
    code, _, err = _run(["predict", model, big, "-o", tmp_path / "a", "-q",
                         "--max-pixels", "10000"], capsys)
    assert code == 1 and "200 x 120 = 24,000 pixels, more than --max-pixels 10,000" in err
    monkeypatch.setattr(batch_scoring, "MAX_OUTPUT_PIXELS", 60 * 100)
    code, _, err = _run(["predict", model, big, "-o", tmp_path / "b", "-q"], capsys)
    assert code == 0, err
    row = _read_csv(tmp_path / "b" / "scores.csv")[0]
    assert (row["width"], row["height"]) == ("200", "120")  # the image's own size
    for name in (row["overlay"], row["mask"]):
        with Image.open(tmp_path / "b" / name) as img:
            assert img.size == (100, 60)
    # the same verdict and, scaled, the same mask as at full size
    monkeypatch.setattr(batch_scoring, "MAX_OUTPUT_PIXELS", 2048 * 2048)
    assert _run(["predict", model, big, "-o", tmp_path / "c", "-q"], capsys)[0] == 0
    assert _read_csv(tmp_path / "c" / "scores.csv")[0]["label"] == row["label"]


def test_interrupted_predict_lists_what_was_done(model, folders, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or a full disk) left a 0-byte PNG and no scores.csv."""
    from skprotoad import plotting

    calls = []
    original = plotting.save_png

    def interrupted(array, path):
        calls.append(path)
        if len(calls) == 5:  # the third image's overlay: two images are done
            raise KeyboardInterrupt
        return original(array, path)

    monkeypatch.setattr(plotting, "save_png", interrupted)
    out = tmp_path / "out"
    code, _, err = _run(["predict", model, folders / "test", "-o", out, "-q"], capsys)
    assert code == 130 and "interrupted" in err
    rows = _read_csv(out / "scores.csv")
    assert [r["overlay"] for r in rows] == ["overlays/img_0.png", "overlays/img_1.png"]
    assert json.loads((out / "run.json").read_text())["complete"] is False
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.stat().st_size > 0 for p in written)
    assert not [p for p in written if p.name.endswith(".tmp")]
    for row in rows:
        assert (out / row["mask"]).is_file()

    def full_disk(array, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plotting, "save_png", full_disk)
    code, _, err = _run(["predict", model, folders / "test", "-o", out, "-q", "--force"], capsys)
    assert code == 1 and "No space left" in err
    assert _read_csv(out / "scores.csv") == []
    assert json.loads((out / "run.json").read_text())["complete"] is False
    # complete runs say so
    monkeypatch.setattr(plotting, "save_png", original)
    assert _run(["predict", model, folders / "test", "-o", out, "-q", "--force"], capsys)[0] == 0
    assert json.loads((out / "run.json").read_text())["complete"] is True


# A Python run with a KeyboardInterrupt as torch is imported: Ctrl-C while it
# loads (seconds). Then the given command line.
_INTERRUPT_TORCH = (
    "import sys, runpy\n"
    "class Interrupt:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch':\n"
    "            raise KeyboardInterrupt\n"
    "sys.meta_path.insert(0, Interrupt())\n"
    "sys.argv = ['skprotoad', *sys.argv[1:]]\n"
    "runpy.run_module('skprotoad', run_name='__main__', alter_sys=True)\n"
)


def _run_interrupting_torch(*argv):
    return subprocess.run([sys.executable, "-c", _INTERRUPT_TORCH, *map(str, argv)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_ctrl_c_during_start_up_exits_130_quietly(folders, tmp_path):
    """While torch was still being imported, Ctrl-C printed a traceback."""
    done = _run_interrupting_torch("fit", folders / "train", "-o", tmp_path / "m.joblib")
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "interrupted" in done.stderr


def test_help_does_not_import_torch():
    """--help took 1.9 s, most of it importing torch, which it does not need."""
    for argv in (["--help"], ["fit", "--help"], ["predict", "--help"], ["--version"]):
        done = _run_interrupting_torch(*argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
    script = "import sys, skprotoad.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


# ---------------------------------------------- defaults and usage errors


def _estimator_params_of(args):
    """The ``ProtoADDetector`` parameters parsed options stand for, converted
    from the command line's representations (lists, an unset crop)."""
    from skprotoad import ProtoADDetector, cli

    params = {name: getattr(args, option) for name, option in cli._DETECTOR_OPTIONS.items()
              if hasattr(args, option)}
    if "layers" in params:
        params["layers"] = tuple(params["layers"])
    if params.get("crop_size") is cli._CROP_UNSET:  # the estimator's, for a size in pixels
        fixed = isinstance(params["image_size"], int)
        params["crop_size"] = ProtoADDetector().crop_size if fixed else None
    return params


def test_defaults_module_matches_the_estimator():
    """skprotoad/_defaults.py, which the command line reads without torch,
    holds the estimator's defaults: every parameter but mean and std."""
    from skprotoad import ProtoADDetector
    from skprotoad._defaults import DETECTOR_DEFAULTS

    estimator = ProtoADDetector().get_params()
    assert set(estimator) - set(DETECTOR_DEFAULTS) == {"mean", "std"}
    assert {name: estimator[name] for name in DETECTOR_DEFAULTS} == dict(DETECTOR_DEFAULTS)


@pytest.mark.parametrize("command", [["fit", "TRAIN", "-o", "M"], ["evaluate", "ROOT"], ["demo"]],
                         ids=lambda v: v[0])
def test_option_defaults_are_the_estimators(command):
    from skprotoad import ProtoADDetector
    from skprotoad.cli import build_parser

    args = build_parser().parse_args(command)
    params = _estimator_params_of(args)
    estimator = ProtoADDetector().get_params()
    # the one deliberate difference: runs of the command line are reproducible
    assert params.pop("random_state") == 0 and estimator["random_state"] is None
    if command[0] == "demo":
        # the demo has a few detector options; its image size is its own
        assert set(params) == {"backbone", "weights", "clustering", "n_clusters", "device"}
    else:
        assert set(params) == set(estimator) - {"random_state", "mean", "std", "verbose",
                                                "n_jobs", "memory"}
    assert params == {name: estimator[name] for name in params}


def test_detector_built_from_default_options_is_the_default_estimator():
    from skprotoad import ProtoADDetector, cli

    args = cli.build_parser().parse_args(["fit", "TRAIN", "-o", "M", "-q"])
    got = cli._make_detector(args).get_params()
    expected = ProtoADDetector(random_state=0).get_params()
    assert got == expected


@pytest.mark.parametrize(
    "command, reader",
    [
        (["fit", "TRAIN", "-o", "OUT/m.joblib"], "collect_images"),
        (["evaluate", "TRAIN", "-o", "OUT/r.json"], "_load_dataset"),
        (["demo", "-o", "OUT/demo"], None),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
@pytest.mark.parametrize(
    "options, message",
    [
        (["--clustering", "kmeans"], "needs n_clusters"),
        (["--device", "tpu"], "device must be"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_of_the_options_come_before_any_data(command, reader, options, message,
                                                         folders, tmp_path, capsys, monkeypatch):
    """--clustering kmeans without --n-clusters was reported (exit code 1)
    only after every training image's header was read (or the data set loaded,
    or the demo's generated)."""
    from skprotoad import cli, datasets

    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    if reader is not None:
        monkeypatch.setattr(cli, reader, no_data)
    monkeypatch.setattr(datasets, "make_defect_dataset", no_data)
    argv = [str(a).replace("TRAIN", str(folders / "train")).replace("OUT", str(tmp_path))
            for a in [*command, "-q", *options]]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
