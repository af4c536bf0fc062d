"""Every script in examples/ runs, quickly, and writes what it promises.

The scripts are run in-process with runpy (one import of torch for all),
from a temporary working directory. Torch is limited to one thread here:
the models are tiny (64 px images), and on a shared CI machine several
OpenMP threads spin-waiting for each other cost far more than they gain.
"""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MAGNETIC_TILE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALL_SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.fixture
def run_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(name, *args):
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        return runpy.run_path(str(EXAMPLES / name), run_name="__main__")

    yield run
    torch.set_num_threads(threads)


def test_every_example_is_tested():
    tested = {
        "plot_quickstart.py",
        "grid_search.py",
        "persistence.py",
        "real_data_magnetic_tile.py",
        "station_onnxruntime.py",
        "large_data_dask.py",
    }
    assert set(ALL_SCRIPTS) == tested, "add a test for each new example"


def test_quickstart(run_example, tmp_path, capsys):
    ns = run_example("plot_quickstart.py", "out")
    assert (tmp_path / "out" / "quickstart_overlay.png").is_file()
    assert ns["maps"].shape == (20, 64, 64)
    assert set(ns["labels"]) <= {-1, 1}
    assert 0.5 < ns["results"]["image_auroc"] <= 1.0
    assert "pixel_auroc" in capsys.readouterr().out


def test_grid_search(run_example):
    ns = run_example("grid_search.py")
    grid = ns["grid"]
    assert grid.best_params_["n_clusters"] in (10, 40)
    assert grid.best_params_["layers"] in ((2, 3), (1, 2, 3))
    assert len(grid.cv_results_["params"]) == 4
    assert set(ns["pipe"].predict(ns["X"][:4])) <= {-1, 1}


def test_persistence(run_example, tmp_path, capsys):
    run_example("persistence.py")
    assert (tmp_path / "detector.joblib").is_file()
    assert "round trip OK" in capsys.readouterr().out


def test_large_data_on_a_dask_cluster(run_example, tmp_path, capsys):
    pytest.importorskip("distributed")
    ns = run_example("large_data_dask.py", "out")
    det, result, same, test_paths = ns["det"], ns["result"], ns["same"], ns["test_paths"]
    assert same, "the fit on the cluster learned other prototypes than a local fit"
    assert det.n_train_images_ == 24
    assert sorted(result["index"]) == list(range(8))
    overlays = sorted(p.name for p in (tmp_path / "out" / "scored" / "overlays").glob("*.png"))
    assert overlays == [f"{i:03d}.png" for i in range(8)]
    np.testing.assert_array_equal(result["anomaly"], det.predict(test_paths) == -1)
    out = capsys.readouterr().out
    assert "== fit in this process: True" in out
    auroc = float(out.split("image AUROC on 8 test images: ")[1].split()[0])
    assert auroc > 0.5, "the cluster-fitted model ranks defective images below normal ones"


def test_real_data_skips_without_data(run_example, tmp_path, capsys):
    run_example("real_data_magnetic_tile.py", "--data", str(tmp_path / "absent"))
    assert "skipping this example" in capsys.readouterr().out


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="Magnetic Tile data not available")
def test_real_data_few_images(run_example, tmp_path, capsys):
    run_example(
        "real_data_magnetic_tile.py", "--data", str(MAGNETIC_TILE),
        "--max-images", "6", "--output", "overlays",
    )
    assert "aupro" in capsys.readouterr().out
    overlays = list((tmp_path / "overlays").glob("*_overlay.png"))
    assert 1 <= len(overlays) <= 3


def test_network_figure_draws(tmp_path):
    """docs/draw_network.py (run by the docs build) works without Sphinx."""
    from PIL import Image

    ns = runpy.run_path(str(EXAMPLES.parent / "docs" / "draw_network.py"))
    path = ns["draw_figure"](tmp_path / "net.png")
    with Image.open(path) as image:
        assert image.width > image.height > 100


@pytest.fixture(scope="module")
def station_model(lite0_detector, tmp_path_factory):
    """The LITE0 detector's whole inference path as the station's ONNX file."""
    pytest.importorskip("onnxruntime")
    from skprotoad.export import to_onnx

    return to_onnx(lite0_detector, tmp_path_factory.mktemp("station") / "station.onnx",
                   pipeline=True)


# torch and skprotoad cannot be imported in the station's process
_STATION_GUARD = ("import sys, runpy; sys.modules['torch'] = None; "
                  "sys.modules['skprotoad'] = None; "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _run_station(*args):
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", _STATION_GUARD, str(EXAMPLES / "station_onnxruntime.py"),
         *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )


def _station_scores(done):
    """(paths, scores, anomaly verdicts) from the station's output lines."""
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()[1:]]
    return [r[0] for r in rows], np.array([float(r[1]) for r in rows]), [r[2] == "anomaly"
                                                                         for r in rows]


def test_station_runs_the_exported_model_without_torch_or_skprotoad(lite0_detector, synthetic,
                                                                   station_model, tmp_path):
    import subprocess

    from PIL import Image

    paths = []
    for i, image in enumerate(synthetic.X_test):
        paths.append(tmp_path / f"img_{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    done = _run_station(station_model, *paths, "--masks", tmp_path / "masks")
    names, scores, verdicts = _station_scores(done)
    assert names == list(map(str, paths))
    np.testing.assert_allclose(scores, -lite0_detector.score_samples(paths), atol=1e-4)
    flagged = lite0_detector.predict(paths) == -1
    assert verdicts == flagged.tolist()
    masks = [np.asarray(Image.open(tmp_path / "masks" / f"img_{i:02d}_mask.png")) > 0
             for i in range(len(paths))]
    assert not any(m.any() for m, f in zip(masks, flagged) if not f)
    expected = lite0_detector.predict_masks(paths, threshold=lite0_detector.pixel_threshold_)
    for mask, want, f in zip(masks, expected, flagged):
        if f:  # the pixels above the pixel threshold (up to float rounding at it)
            assert np.mean(mask == want) > 0.99
    # and the guard does keep torch out
    blocked = subprocess.run(
        [sys.executable, "-c", _STATION_GUARD.split(" sys.argv")[0] + " import torch"],
        capture_output=True, text=True,
    )
    assert blocked.returncode != 0 and "import of torch halted" in blocked.stderr


def test_station_reads_files_as_the_estimator(lite0_detector, synthetic, station_model,
                                              tmp_path):
    """A camera's JPEGs with an EXIF orientation are scored upright, as the
    estimator reads them (the station scored them as stored); 16-bit and
    transparent images are refused as the estimator refuses them (the
    station clipped them to 8 bits and dropped the alpha)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn off, as cameras held upright write them
    paths = []
    for i, image in enumerate(synthetic.X_test[[0, 1, -2, -1]]):
        upright = Image.fromarray(image).resize((96, 64))  # not square: the turn shows
        paths.append(tmp_path / f"camera_{i}.jpg")
        upright.transpose(Image.Transpose.ROTATE_90).save(paths[-1], exif=exif.tobytes(),
                                                          quality=95)
    _, scores, verdicts = _station_scores(_run_station(station_model, *paths))
    np.testing.assert_allclose(scores, -lite0_detector.score_samples(paths), atol=1e-4)
    assert verdicts == (lite0_detector.predict(paths) == -1).tolist()

    image = synthetic.X_test[0]
    deep = tmp_path / "deep.png"
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(deep)
    transparent = tmp_path / "transparent.png"
    alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
    alpha[:8] = 0
    Image.fromarray(np.concatenate([image, alpha], axis=2)).save(transparent)
    for path, match in [(deep, "16-bit"), (transparent, "transparent pixels")]:
        with pytest.raises(ValueError, match=match):
            lite0_detector.score_samples([path])
        done = _run_station(station_model, path)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert str(path) in done.stderr and match in done.stderr
