"""Every script in examples/ runs, quickly, and writes what it promises.

The scripts are run in-process with runpy (one import of torch for all),
from a temporary working directory. Torch is limited to one thread here:
the models are tiny (64 px images), and on a shared CI machine several
OpenMP threads spin-waiting for each other cost far more than they gain.
"""

import runpy
import sys
from pathlib import Path

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
