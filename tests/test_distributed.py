"""GridSearchCV of a ProtoADDetector under joblib's Dask backend.

A 2-worker ``LocalCluster`` of processes, as docs/user_guide/model_selection.md
shows. With ``processes=False`` (workers as threads of this process) the test
took about 5 s instead of 19-26 s, but its fits were not reproducible: two fits
running as threads of one process gave different prototypes from one run to
the next (shared process-wide thread settings change the float rounding), so
the comparison with a sequential search failed at random.
"""

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skprotoad import ProtoADDetector

from .conftest import TINY

distributed = pytest.importorskip("distributed")


def _search():
    return GridSearchCV(
        ProtoADDetector(**{**TINY, "contamination": 0.1}),
        param_grid={"n_clusters": [4, 16]},
        scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
        error_score="raise",
    )


def test_grid_search_on_a_dask_cluster_matches_a_sequential_one(normal_images, synthetic):
    X = np.concatenate([normal_images, synthetic.X_test])
    y = np.r_[np.ones(len(normal_images), int), np.where(synthetic.y_test == 1, -1, 1)]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        distributed.get_task_stream(client) as tasks,
        joblib.parallel_backend("dask"),
    ):
        on_dask = _search().fit(X, y)
    # the fits ran as tasks on the cluster (joblib may batch several per task)
    assert tasks.data and all(task["worker"] for task in tasks.data)

    sequential = _search().fit(X, y)
    assert on_dask.best_params_ == sequential.best_params_
    np.testing.assert_array_equal(
        on_dask.cv_results_["mean_test_score"], sequential.cv_results_["mean_test_score"]
    )
    np.testing.assert_array_equal(
        on_dask.best_estimator_.score_samples(X), sequential.best_estimator_.score_samples(X)
    )
    np.testing.assert_array_equal(
        on_dask.best_estimator_.prototypes_, sequential.best_estimator_.prototypes_
    )
