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


# ---------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture()
def image_files(synthetic, tmp_path):
    """13 test images as PNG files, the 6th unreadable."""
    from PIL import Image

    paths = []
    for i, image in enumerate(synthetic.X_test[:13]):
        path = tmp_path / f"img{i:02d}.png"
        if i == 5:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.asarray(image * 255, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _assert_same_result(got, expected):
    np.testing.assert_array_equal(got["index"], expected["index"])
    np.testing.assert_array_equal(got["score"], expected["score"])
    np.testing.assert_array_equal(got["anomaly"], expected["anomaly"])
    for key in ("size", "overlay", "mask", "skipped"):
        assert got[key] == expected[key], key


def test_scoring_on_a_cluster_matches_the_single_process_loop(
    tiny_detector, image_files, tmp_path, client
):
    from skprotoad import batch_scoring
    from skprotoad.distributed import score_and_write

    names = [f"n{i}" for i in range(len(image_files))]
    local = batch_scoring.score_and_write(
        tiny_detector, image_files, names=names, out_dir=tmp_path / "local", keep_maps=True
    )
    assert local["skipped"] and local["skipped"][0][0] == 5  # the unreadable file
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    # 8 images a task (the detector's batch_size, so that the batches are the
    # local loop's): the unreadable image in the first, a short last one
    spread = score_and_write(
        tiny_detector, image_files, names=names, out_dir=tmp_path / "dask",
        partition_size=8, client=client, progress=bar, keep_maps=True,
    )
    assert bar.n == len(image_files)
    _assert_same_result(spread, local)
    np.testing.assert_array_equal(spread["maps"], local["maps"])
    # the workers wrote every file, byte for byte as the local loop
    for rel in spread["overlay"] + spread["mask"]:
        assert (tmp_path / "dask" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes()
    # Dask's current scheduler (here the client, made current) without a client;
    # other batches than the local loop's: the same up to float rounding
    other = score_and_write(tiny_detector, image_files, partition_size=3)
    np.testing.assert_allclose(other["score"], local["score"], rtol=1e-6)
    np.testing.assert_array_equal(other["index"], local["index"])


def test_scoring_on_local_threads_matches_the_single_process_loop(tiny_detector, image_files):
    import dask

    from skprotoad import batch_scoring
    from skprotoad.distributed import score_and_write

    with dask.config.set(scheduler="threads"):
        spread = score_and_write(tiny_detector, image_files, partition_size=3,
                                 threshold=0.5)
    expected = batch_scoring.score_and_write(tiny_detector, image_files, threshold=0.5)
    np.testing.assert_allclose(spread["score"], expected["score"], rtol=1e-6)
    np.testing.assert_array_equal(spread["index"], expected["index"])
    assert spread["skipped"] == expected["skipped"]


def test_scoring_on_dask_refuses_bad_arguments(tiny_detector, image_files):
    from skprotoad.distributed import score_and_write

    with pytest.raises(ValueError, match="partition_size"):
        score_and_write(tiny_detector, image_files, partition_size=0)
    with pytest.raises(ValueError, match="names"):
        score_and_write(tiny_detector, image_files, out_dir="x")
    with pytest.raises(ValueError, match="write must have one entry per item"):
        score_and_write(tiny_detector, image_files, write=[True])


def test_cli_predict_on_a_scheduler_writes_what_a_local_predict_writes(
    tiny_detector, image_files, tmp_path, client, capsys
):
    from skprotoad.cli import main

    model = tmp_path / "model.joblib"
    joblib.dump(tiny_detector, model)
    folder = str(tmp_path)  # the 13 images, one unreadable
    assert main(["predict", str(model), folder, "-o", str(tmp_path / "local"), "-q"]) == 0
    assert main(["predict", str(model), folder, "-o", str(tmp_path / "dask"), "-q",
                 "--scheduler", client.scheduler.address]) == 0
    for name in ("scores.csv", "skipped.csv"):
        assert (tmp_path / "dask" / name).read_text() == (tmp_path / "local" / name).read_text()
    written = sorted(p.relative_to(tmp_path / "dask").as_posix()
                     for p in (tmp_path / "dask").rglob("*.png"))
    assert len(written) == 2 * 12
    assert written == sorted(p.relative_to(tmp_path / "local").as_posix()
                             for p in (tmp_path / "local").rglob("*.png"))
    capsys.readouterr()
    # a scheduler that cannot be reached is a usage error, before any scoring
    code = main(["predict", str(model), folder, "-o", str(tmp_path / "none"), "-q",
                 "--scheduler", "nonsense://nowhere"])
    assert code == 2 and "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- fit
def test_fit_extracts_features_on_the_cluster_under_joblibs_dask_backend(
    synthetic, client, monkeypatch
):
    from skprotoad import _features

    # 2 images a task: 12 training images make 6 tasks
    monkeypatch.setattr(_features, "SHARD_BATCHES", 1)
    params = {**TINY, "batch_size": 2, "max_patches": 12 * 100}  # a sample of each image
    X = synthetic.X_train[:12]
    local = ProtoADDetector(**params).fit(X)
    with distributed.get_task_stream(client) as tasks, joblib.parallel_config(backend="dask"):
        spread = ProtoADDetector(**params).fit(X)
    names = [task["key"] if isinstance(task["key"], str) else str(task["key"])
             for task in tasks.data]
    assert sum("shard_features" in name for name in names) >= 2  # joblib may batch calls
    np.testing.assert_array_equal(spread.prototypes_, local.prototypes_)
    assert spread.offset_ == local.offset_
    np.testing.assert_array_equal(spread.calibration_scores_, local.calibration_scores_)


def test_cli_fit_on_a_scheduler_saves_the_model_a_local_fit_saves(
    image_files, tmp_path, client, monkeypatch
):
    from skprotoad import _features
    from skprotoad.cli import main

    monkeypatch.setattr(_features, "SHARD_BATCHES", 1)
    train = [p for p in image_files if not p.endswith("img05.png")]  # the readable ones
    options = ["-q", "--backbone", "resnet18", "--weights", "none", "--layers", "1", "2",
               "--image-size", "64", "--clustering", "kmeans", "--n-clusters", "8",
               "--n-farthest", "0", "--batch-size", "4", "--seed", "0",
               "--normalization", "patch"]
    assert main(["fit", *train, "-o", str(tmp_path / "local.joblib"), *options]) == 0
    with distributed.get_task_stream(client) as tasks:
        assert main(["fit", *train, "-o", str(tmp_path / "dask.joblib"), *options,
                     "--scheduler", client.scheduler.address]) == 0
    assert any("shard_features" in str(task["key"]) for task in tasks.data)
    local, spread = (joblib.load(tmp_path / f) for f in ("local.joblib", "dask.joblib"))
    np.testing.assert_array_equal(spread.prototypes_, local.prototypes_)
    assert spread.offset_ == local.offset_
