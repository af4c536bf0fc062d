"""device="cuda": the same scores and maps as the CPU (skipped without a GPU)."""

import copy
import pickle

import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector

from .conftest import LITE0

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def lite0_params():
    # 3 x 3 averaging on, so that its pooling runs on the GPU too
    return {**LITE0, "neighborhood_size": 3}


def test_fitted_on_cpu_scores_the_same_on_cuda(lite0_detector, synthetic):
    cuda = copy.deepcopy(lite0_detector).set_params(device="cuda")
    np.testing.assert_allclose(
        cuda.score_samples(synthetic.X_test), lite0_detector.score_samples(synthetic.X_test),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        cuda.anomaly_maps(synthetic.X_test), lite0_detector.anomaly_maps(synthetic.X_test),
        atol=1e-4,
    )


@pytest.mark.parametrize("clustering", ["kmeans", "finch"])
def test_fit_on_cuda_matches_fit_on_cpu(lite0_params, synthetic, clustering):
    params = dict(lite0_params, clustering=clustering)
    if clustering == "finch":
        params["n_clusters"] = None
    cpu = ProtoADDetector(**params, device="cpu").fit(synthetic.X_train)
    gpu = ProtoADDetector(**params, device="cuda").fit(synthetic.X_train)
    # float32 sums in another order can flip a near-tie in the clustering and
    # move a prototype, so fits are compared by their scores, not bit for bit
    cpu_scores = cpu.score_samples(synthetic.X_test)
    gpu_scores = gpu.score_samples(synthetic.X_test)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-2)
    assert np.corrcoef(gpu_scores, cpu_scores)[0, 1] > 0.99


def test_cuda_model_pickles_to_cpu(lite0_params, synthetic):
    gpu = ProtoADDetector(**lite0_params, device="cuda").fit(synthetic.X_train)
    restored = pickle.loads(pickle.dumps(gpu))
    assert restored.network_.prototypes.device.type == "cpu"
    restored.set_params(device="cpu")
    np.testing.assert_allclose(
        restored.score_samples(synthetic.X_test), gpu.score_samples(synthetic.X_test), atol=1e-4
    )


def test_scoring_on_cuda_moves_the_network_once(lite0_detector, synthetic, monkeypatch):
    # device="cuda" names no index; the network's tensors report "cuda:N"
    cuda = copy.deepcopy(lite0_detector).set_params(device="cuda")
    expected = cuda.score_samples(synthetic.X_test[:2])

    def no_move(*args, **kwargs):
        raise AssertionError("moved a network that was on its device already")

    monkeypatch.setattr(torch.nn.Module, "to", no_move)
    np.testing.assert_array_equal(cuda.score_samples(synthetic.X_test[:2]), expected)
