"""ProtoADDetector(n_jobs=...): torch threads per call, restored afterwards,
and no oversubscription when joblib runs fits in parallel."""

import threading

import joblib
import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, KFold

from skprotoad import ProtoADDetector
from skprotoad._threads import effective_n_threads, torch_threads

from .conftest import TINY


class ThreadRecordingDetector(ProtoADDetector):
    """Records torch's thread count while fit extracts features."""

    def _extract_features(self, *args, **kwargs):
        self.threads_seen_ = torch.get_num_threads()
        return super()._extract_features(*args, **kwargs)


def _threads_seen(estimator, X, y=None):
    """A 'score' that reports the thread count a fit ran with."""
    return estimator.threads_seen_


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(previous)


def test_n_jobs_holds_for_the_call_only(normal_images, two_threads, monkeypatch):
    det = ThreadRecordingDetector(**TINY, n_jobs=1).fit(normal_images[:6])
    assert det.threads_seen_ == 1
    assert torch.get_num_threads() == two_threads

    seen = []
    readout = type(det.network_).readout

    def recording_readout(self, *args):
        seen.append(torch.get_num_threads())
        return readout(self, *args)

    monkeypatch.setattr(type(det.network_), "readout", recording_readout)
    for method in ("score_samples", "decision_function", "predict", "anomaly_maps",
                   "predict_masks"):
        seen.clear()
        getattr(det, method)(normal_images[:2])
        assert seen and set(seen) == {1}, method
        assert torch.get_num_threads() == two_threads


def test_threads_are_restored_when_the_call_fails(normal_images, two_threads):
    det = ProtoADDetector(**{**TINY, "n_clusters": 10**6}, n_jobs=1)
    with pytest.raises(ValueError, match="n_clusters"):
        det.fit(normal_images[:6])
    assert torch.get_num_threads() == two_threads


def test_n_jobs_none_leaves_torch_alone(normal_images, two_threads):
    det = ThreadRecordingDetector(**TINY).fit(normal_images[:6])
    assert det.threads_seen_ == two_threads == torch.get_num_threads()


def test_overlapping_calls_in_threads_restore_the_count_from_before(two_threads):
    # A starts, B starts, A ends, B ends: B restored the count A had set
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with torch_threads(1):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with torch_threads(3):
            b_in.set()
            a_out.wait(10)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    seen = []
    new = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    new.start()
    new.join()
    assert seen == [2] and torch.get_num_threads() == 2


def test_effective_n_threads():
    cpus = joblib.cpu_count()
    assert effective_n_threads(None) is None
    assert effective_n_threads(3) == 3
    assert effective_n_threads(-1) == cpus
    assert effective_n_threads(-2) == max(cpus - 1, 1)
    assert effective_n_threads(-1000) == 1


@pytest.mark.parametrize(
    "n_jobs, error", [(0, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]
)
def test_bad_n_jobs_is_named(normal_images, n_jobs, error):
    with pytest.raises(error, match="n_jobs"):
        ProtoADDetector(**TINY, n_jobs=n_jobs).fit(normal_images[:6])


def test_parallel_search_does_not_oversubscribe(normal_images):
    """Fits in joblib's loky workers see cpu_count // n_workers torch threads."""
    n_workers = 2
    search = GridSearchCV(
        ThreadRecordingDetector(**{**TINY, "contamination": 0.1}),
        {"n_clusters": [8]},
        scoring=_threads_seen,
        cv=KFold(2),
        refit=False,
        n_jobs=n_workers,
        error_score="raise",
    )
    before = torch.get_num_threads()
    with joblib.parallel_config(backend="loky"):
        search.fit(normal_images)
    seen = np.concatenate(
        [search.cv_results_[f"split{i}_test_score"] for i in range(search.n_splits_)]
    )
    limit = max(joblib.cpu_count() // n_workers, 1)
    assert len(seen) == 2 and 1 <= seen.min() and seen.max() <= limit, seen
    assert torch.get_num_threads() == before  # the parent's setting is untouched
