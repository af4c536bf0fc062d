"""Model selection: GridSearchCV over prototypes and layers, and a Pipeline.

``ProtoADDetector.fit(X, y)`` learns from the images labelled ``y == 1``
(normal) only, so cross-validation on a labelled, mixed set of normal and
anomalous images is meaningful: each split fits on the normal images of its
training folds and is scored, with ``scoring="roc_auc"``, by how well
``decision_function`` separates the normal (+1) from the anomalous (-1)
images of its validation fold.

The second part wraps the detector in a :class:`~sklearn.pipeline.Pipeline`
with a preprocessing step (grey conversion, as for a monochrome camera) and
fits it.

    python examples/grid_search.py
"""

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from skprotoad import ProtoADDetector
from skprotoad.datasets import make_defect_dataset

data = make_defect_dataset(n_train=10, n_test=10, image_size=(64, 64), random_state=0)

# Labelled, mixed data in scikit-learn's outlier convention: 1 normal, -1 anomaly.
X = np.concatenate([data.X_train, data.X_test])
y = np.concatenate([np.ones(len(data.X_train), int), np.where(data.y_test == 1, -1, 1)])

base = ProtoADDetector(image_size=64, crop_size=64, clustering="kmeans", random_state=0)
grid = GridSearchCV(
    base,
    param_grid={"n_clusters": [10, 40], "layers": [(2, 3), (1, 2, 3)]},
    scoring="roc_auc",
    # stratified folds keep anomalies in every validation fold
    cv=StratifiedKFold(n_splits=2, shuffle=True, random_state=0),
)
grid.fit(X, y)
for params, score in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"]):
    print(f"{params}: mean ROC AUC {score:.3f}")
print("best:", grid.best_params_)

# The refitted best model (learned from all images labelled 1) is ready to use.
best = grid.best_estimator_
print("prototypes of the best model:", best.prototypes_.shape)


# A Pipeline: any image-to-image step can precede the detector.
def to_grey(images):
    """RGB uint8 (n, h, w, 3) -> grey replicated on 3 channels."""
    grey = np.asarray(images, dtype=np.float32).mean(axis=-1, keepdims=True)
    return np.repeat(grey, 3, axis=-1).round().astype(np.uint8)


pipe = Pipeline([
    ("grey", FunctionTransformer(to_grey)),
    ("detector", ProtoADDetector(image_size=64, crop_size=64, clustering="kmeans",
                                 n_clusters=40, layers=(2, 3), random_state=0)),
])
# Parameters of a step are addressed as <step>__<parameter>, e.g. a grid
# {"detector__sigma": [2.0, 4.0]} for GridSearchCV(pipe, ...).
pipe.fit(X, y)
print("pipeline predictions on the last 4 images:", pipe.predict(X[-4:]))
print("pipeline decision_function:", np.round(pipe.decision_function(X[-4:]), 4))
