"""docs/tutorial.md runs as written, on small generated data in place of $DATA."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skprotoad.datasets import make_defect_dataset

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
# the demo at its smallest: its defaults take a minute
SMALL_DEMO = ["--n-train", "8", "--n-test", "6", "--size", "64", "--clustering", "kmeans",
              "--n-clusters", "16"]


def _commands():
    blocks = re.findall(r"```bash\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    # installing and cloning are the reader's; setting DATA is the test's
    return [line for line in lines if not re.match(r"(git|pip|cd)\b|DATA=", line)]


def _fake_mvtec(root):
    data = make_defect_dataset(n_train=12, n_test=8, image_size=64, random_state=0)
    for i, image in enumerate(data.X_train):
        Image.fromarray(image).save(_mkdir(root / "train" / "good") / f"{i:03d}.png")
    for i, (image, label) in enumerate(zip(data.X_test, data.y_test)):
        kind = "crack" if label else "good"
        Image.fromarray(image).save(_mkdir(root / "test" / kind) / f"{i:03d}.png")
        if label:
            mask = data.masks_test[i].astype(np.uint8) * 255
            Image.fromarray(mask).save(_mkdir(root / "ground_truth" / kind) / f"{i:03d}_mask.png")
    return root


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_tutorial_runs_as_written(tmp_path):
    pytest.importorskip("matplotlib")
    commands = _commands()
    assert [c.split()[3] for c in commands] == ["demo", "fit", "predict", "evaluate"]
    # this checkout's skprotoad, whatever is installed
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DATA": str(_fake_mvtec(tmp_path / "data")), "PYTHONPATH": path}
    work = _mkdir(tmp_path / "work")
    for command in commands:
        command = command.replace("python -m skprotoad", f"{sys.executable} -m skprotoad", 1)
        if " demo" in command:
            command += " " + " ".join(SMALL_DEMO)
        done = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    # what the tutorial says each step leaves behind
    assert (work / "demo_output" / "grid.png").is_file()
    assert (work / "tile.safetensors").is_file()
    assert (work / "inspected" / "scores.csv").is_file()
    assert (work / "inspected" / "report" / "index.html").is_file()
    assert (work / "tile_results.json").is_file()
    assert (work / "tile_report" / "index.html").is_file()
    # the demo replaces its own output when run again, as the tutorial says
    again = subprocess.run(f"{sys.executable} -m skprotoad demo -q " + " ".join(SMALL_DEMO),
                           shell=True, cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
