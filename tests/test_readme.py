"""The README's example runs as written."""

import re

import numpy as np
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "detector.joblib").is_file()
    assert set(namespace["labels"]) <= {-1, 1}
    assert namespace["maps"].shape == (16, 64, 64)
    grid = namespace["grid"]
    assert grid.best_params_["n_clusters"] in (20, 50)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
