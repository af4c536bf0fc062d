"""Persistence: save a fitted detector with joblib and load it back.

The file stores the backbone truncated after the last stage used, the
prototypes and the configuration, all on CPU, so a model fitted on a GPU
loads on a CPU-only machine. Loading it needs skprotoad (and torch, timm)
but not the backbone's pre-trained weights.

Security: a joblib (pickle) file can execute arbitrary code when loaded.
Load only files you created or trust.

    python examples/persistence.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import joblib
import numpy as np

from skprotoad import ProtoADDetector
from skprotoad.datasets import make_defect_dataset

data = make_defect_dataset(n_train=20, n_test=8, image_size=(64, 64), random_state=0)
det = ProtoADDetector(
    image_size=64, crop_size=64, clustering="kmeans", n_clusters=30, random_state=0
).fit(data.X_train)

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out_dir.mkdir(parents=True, exist_ok=True)
path = out_dir / "detector.joblib"
joblib.dump(det, path)
print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB)")

loaded = joblib.load(path)  # only load files you trust: pickles can run code
print("loaded:", loaded)
print("device of the loaded network:", next(loaded.network_.parameters()).device)

# Same parameters, same threshold, same scores and maps.
assert loaded.get_params() == det.get_params()
assert loaded.offset_ == det.offset_
np.testing.assert_allclose(loaded.score_samples(data.X_test),
                           det.score_samples(data.X_test), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(loaded.anomaly_maps(data.X_test),
                           det.anomaly_maps(data.X_test), rtol=1e-5, atol=1e-6)
print("round trip OK: identical scores and maps")
