"""What the command line writes: nothing a user saved is lost or replaced
without --force, every output checked before any work, any file name."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import joblib
import pytest
from PIL import Image

from skprotoad import cli
from skprotoad.cli import main
from skprotoad.cli_files import (
    load_model,
    CommandError,
    _is_output_name,
    check_distinct_outputs,
    check_file_free,
    collect_images,
    output_names,
    prepare_out_dir,
)

# A random resnet18 (conftest.TINY's) as options: only its parameters' checks
# run here, the fit itself is replaced by the session's fitted detector.
OPTIONS = ["--backbone", "resnet18", "--weights", "none", "--layers", "1", "2",
           "--image-size", "64", "--crop-size", "64", "--clustering", "kmeans",
           "--n-clusters", "16", "-q"]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_detector):
    path = tmp_path_factory.mktemp("model") / "m.joblib"
    joblib.dump(tiny_detector, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory, synthetic):
    """Two test images, in a folder of their own."""
    root = tmp_path_factory.mktemp("images")
    for i in range(2):
        _save(synthetic.X_test[i], root / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory, synthetic):
    """A one-category MVTec AD tree: 2 good training images, 2 good and 2 defect tests."""
    cat = tmp_path_factory.mktemp("mvtec") / "widget"
    for i in range(2):
        _save(synthetic.X_train[i], cat / "train" / "good" / f"{i:03d}.png")
    normal = [i for i, y in enumerate(synthetic.y_test) if y == 0][:2]
    defect = [i for i, y in enumerate(synthetic.y_test) if y == 1][:2]
    for k, i in enumerate(normal):
        _save(synthetic.X_test[i], cat / "test" / "good" / f"{k:03d}.png")
    for k, i in enumerate(defect):
        _save(synthetic.X_test[i], cat / "test" / "scratch" / f"{k:03d}.png")
        _save(synthetic.masks_test[i].astype("uint8") * 255,
              cat / "ground_truth" / "scratch" / f"{k:03d}_mask.png")
    return cat


def _fit_creating(path, content, tiny_detector):
    """A stand-in for cli._fit: another program writes ``path`` meanwhile."""

    def fit(args, detector, train):
        Path(path).write_bytes(content)
        vars(detector).update(vars(tiny_detector))
        return 0.0

    return fit


def _no_fit(*args, **kwargs):
    raise AssertionError("the fit started")


# ------------------------------------------------- demo and predict outputs


def test_demo_does_not_replace_a_predict_runs_output(model, images, tmp_path, capsys):
    """demo -o OUT, without --force, deleted the overlays, masks, scores.csv
    and run.json of a predict run there: every manifest read as the demo's."""
    out = tmp_path / "out"
    code, _, err = _run(["predict", model, images, "-o", out, "-q"], capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _run(["demo", "-o", out, "--n-train", "6", "--n-test", "4", "--size", "32",
                         "--weights", "none", "-q"], capsys)
    assert code == 2 and "--force" in err and "predict" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command, replaced", [("demo", True), ("predict", False), (None, False)])
def test_replace_own_only_replaces_the_same_commands_output(command, replaced, tmp_path):
    """A manifest without a command (written before it was recorded) is not the demo's."""
    (tmp_path / "scores.csv").write_text("old")
    manifest = {"files": ["scores.csv"]} | ({"command": command} if command else {})
    (tmp_path / ".skprotoad-outputs.json").write_text(json.dumps(manifest))
    if replaced:
        prepare_out_dir(tmp_path, False, ["scores.csv"], "demo", replace_own=True)
        assert not (tmp_path / "scores.csv").exists()
        written = json.loads((tmp_path / ".skprotoad-outputs.json").read_text())
        assert written["command"] == "demo"
    else:
        with pytest.raises(CommandError, match="not empty.*--force") as info:
            prepare_out_dir(tmp_path, False, ["scores.csv"], "demo", replace_own=True)
        assert info.value.code == 2 and (tmp_path / "scores.csv").read_text() == "old"


def test_a_file_where_an_output_folder_goes_is_refused_before_any_work(model, images, tmp_path,
                                                                      capsys):
    """--force with a file named OUT/overlays failed at the first overlay
    (exit code 1, [Errno 17]), after scoring started, leaving an empty scores.csv."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlays").write_text("mine")
    code, _, err = _run(["predict", model, images, "-o", out, "-q", "--force"], capsys)
    assert code == 2 and "overlays" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["overlays"]
    assert (out / "overlays").read_text() == "mine"


# ------------------------------------------------------------ file names


def test_names_with_a_backslash_are_replaced_by_a_later_force_run(model, synthetic, tmp_path,
                                                                  capsys):
    """predict --force refused its own earlier overlay of a\\b.png: the
    manifest check rejected names with a backslash that output_names gave."""
    image = _save(synthetic.X_test[0], tmp_path / "in" / "a\\b.png")
    out = tmp_path / "out"
    for extra in ([], ["--force"]):
        code, _, err = _run(["predict", model, image, "-o", out, "-q", *extra], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a_b.png"]
    weird = ["x/a\\b.png", "y/a\\b.png", "c\\d/e.png", "f/e.png", "..png", "g/..png"]
    assert all(_is_output_name(f"{folder}/{name}.png")
               for name in output_names(weird) for folder in ("overlays", "masks"))


def test_long_file_names(model, synthetic, tiny_detector, tmp_path, capsys, monkeypatch):
    """Names of up to 255 bytes are legal, but the temporary file
    .NAME.XXXXXXXX.tmp was not: predict scored none of them, fit failed after
    the fit. A name past the limit is refused before any work."""
    long_name = "L" * 251 + ".png"  # 255 bytes
    image = _save(synthetic.X_test[0], tmp_path / "in" / long_name)
    out = tmp_path / "out"
    code, _, err = _run(["predict", model, image, "-o", out, "-q"], capsys)
    assert code == 0, err
    assert (out / "overlays" / long_name).is_file() and (out / "masks" / long_name).is_file()

    monkeypatch.setattr(cli, "_fit", _fit_creating(tmp_path / "other", b"", tiny_detector))
    target = tmp_path / ("m" * 248 + ".joblib")  # 255 bytes
    code, _, err = _run(["fit", image.parent, "-o", target, *OPTIONS], capsys)
    assert code == 0, err
    assert joblib.load(target).n_train_images_ == tiny_detector.n_train_images_

    monkeypatch.setattr(cli, "_fit", _no_fit)
    too_long = tmp_path / ("m" * 249 + ".joblib")  # 256 bytes
    code, _, err = _run(["fit", image.parent, "-o", too_long, *OPTIONS], capsys)
    assert code == 2 and "cannot write model file" in err and "too long" in err, err
    with pytest.raises(CommandError, match="too long") as info:
        check_file_free(tmp_path / "new" / ("r" * 256), False, "results file")
    assert info.value.code == 2


def test_non_ascii_names_under_a_non_utf8_locale(model, synthetic, tmp_path):
    """scores.csv was written in the locale's encoding: under LC_ALL=C a
    non-ASCII name failed after scoring, and no run.json was written."""
    name = "ünïcødé 名前.png"
    image = _save(synthetic.X_test[0], tmp_path / "in" / name)
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = subprocess.run(
        [sys.executable, "-m", "skprotoad", "predict", str(model), str(image.parent), "-o",
         str(tmp_path / "out"), "-q"], capture_output=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    with open(tmp_path / "out" / "scores.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [name]
    assert json.loads((tmp_path / "out" / "run.json").read_text("utf-8"))["complete"] is True


# ---------------------------------------------------------------- inputs


def test_broken_links_are_listed_and_named_hidden_images_scored(synthetic, tmp_path):
    """A dangling link in a folder appeared in neither scores.csv nor
    skipped.csv; a hidden image named explicitly was "not an image file"."""
    folder = tmp_path / "in"
    _save(synthetic.X_test[0], folder / "a.png")
    hidden = _save(synthetic.X_test[1], folder / ".hidden.png")
    os.symlink(tmp_path / "nowhere.png", folder / "broken.png")
    paths, skipped = collect_images([folder])
    # hidden files found in a folder stay left out, silently
    assert paths == [str(folder / "a.png")]
    assert skipped == [(str(folder / "broken.png"), "a broken link")]
    paths, skipped = collect_images([hidden])
    assert paths == [str(hidden)] and skipped == []


# --------------------------------------------------------- fit, evaluate


@pytest.mark.parametrize("name", ["m.joblib", "m.safetensors"])
def test_fit_keeps_a_model_file_created_while_it_ran(name, images, tiny_detector, tmp_path,
                                                     capsys, monkeypatch):
    """MODEL was checked to be free at the start, then written with
    overwrite=True: a file created there during the fit was replaced. Then
    the fitted model was thrown away: now it is written beside."""
    target = tmp_path / name
    beside = target.with_name(f"{target.stem}-1{target.suffix}")
    monkeypatch.setattr(cli, "_fit", _fit_creating(target, b"theirs", tiny_detector))
    code, _, err = _run(["fit", images, "-o", target, *OPTIONS], capsys)
    assert code == 1 and "kept" in err and str(beside) in err and "overwrite=True" not in err, err
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, beside.name])  # no temp
    assert load_model(beside).n_train_images_ == tiny_detector.n_train_images_
    beside.unlink()
    code, _, err = _run(["fit", images, "-o", target, "--force", *OPTIONS], capsys)
    assert code == 0, err
    assert target.read_bytes() != b"theirs"


def test_evaluate_keeps_a_results_file_created_while_it_ran(mvtec, tiny_detector, tmp_path,
                                                            capsys, monkeypatch):
    target = tmp_path / "results.json"
    monkeypatch.setattr(cli, "_fit", _fit_creating(target, b"theirs", tiny_detector))
    code, _, err = _run(["evaluate", mvtec, "-o", target, *OPTIONS], capsys)
    assert code == 1 and "--force" in err and "overwrite=True" not in err, err
    assert target.read_bytes() == b"theirs"


@pytest.mark.parametrize("outputs", [
    ["-o", "X", "--save-model", "X"],
    ["-o", "X", "--save-model", "sub/../X"],
    ["-o", "R/roc.png", "--report", "R"],
    ["-o", "R", "--report", "R"],
    ["--save-model", "M", "--report", "M/sub"],
])
def test_evaluate_refuses_outputs_that_collide(outputs, mvtec, tmp_path, capsys, monkeypatch):
    """evaluate -o X --save-model X replaced the saved model with the JSON."""
    if "--report" in outputs:
        pytest.importorskip("matplotlib")
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(cli, "_fit", _no_fit)
    argv = [str(tmp_path / a) if not a.startswith("-") else a for a in outputs]
    code, _, err = _run(["evaluate", mvtec, *argv, *OPTIONS], capsys)
    assert code == 2 and "both write" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_distinct_outputs_may_share_a_folder(tmp_path):
    check_distinct_outputs([("-o", tmp_path / "R" / "results.json"),
                            ("--save-model", tmp_path / "m.joblib"),
                            ("--report", tmp_path / "R" / "index.html")],
                           [("--report", tmp_path / "R")])


def test_evaluate_checks_every_report_file_before_any_work(mvtec, tmp_path, capsys,
                                                           monkeypatch):
    """Only DIR/index.html was checked: with DIR/roc.png there, evaluate
    failed after the whole fit (exit code 1, naming overwrite=True) and never
    wrote its results."""
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    report.mkdir()
    (report / "roc.png").write_bytes(b"mine")
    monkeypatch.setattr(cli, "_fit", _no_fit)
    code, _, err = _run(["evaluate", mvtec, "--report", report, "-o", tmp_path / "r.json",
                         *OPTIONS], capsys)
    assert code == 2 and "roc.png" in err and "--force" in err, err
    assert (report / "roc.png").read_bytes() == b"mine" and not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------ docs


def test_masks_are_documented_at_the_images_size(capsys):
    """The help and docs/cli.md said masks have the overlay's size (which is
    enlarged for small images); they have the image's."""
    code, out, _ = _run(["predict", "--help"], capsys)
    assert code == 0 and "overlay's size" not in out
    assert "image's own size" in out.split("masks/NAME.png")[1].split("\n")[0]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text("utf-8")
    row = next(line for line in docs.splitlines() if line.startswith("| `masks/NAME.png`"))
    assert "image's own size" in row and "overlay's size" not in row
