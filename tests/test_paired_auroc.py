"""Checks of the benchmarks' paired image-AUROC comparison (bench_paired_auroc)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_paired_auroc import auroc_of_resamples, compare, stratified_resamples  # noqa: E402


def scored_set(rng, n_normal=25, n_defective=40):
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_defective, int)]
    scores = np.round(rng.normal(size=len(labels)) + 0.7 * labels, 1)  # rounding makes ties
    return labels, scores


def test_resampled_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    labels, scores = scored_set(rng)
    resamples = stratified_resamples(labels, 30, rng)
    expected = [roc_auc_score(labels[r], scores[r]) for r in resamples]
    np.testing.assert_allclose(auroc_of_resamples(scores, labels, resamples), expected)


def test_resamples_keep_each_class_size_and_draw_within_it():
    rng = np.random.default_rng(1)
    labels, _ = scored_set(rng, 7, 11)
    resamples = stratified_resamples(labels, 50, rng)
    assert resamples.shape == (50, 18)
    assert (labels[resamples].sum(axis=1) == 11).all()
    assert len(np.unique(resamples)) > 11  # drawn with replacement, not a permutation


def rows_of(labels, by_setting):
    return [{"set": "s", "seed": 0, "n_train": 9, "setting": name,
             "test_scores": list(map(float, scores)), "test_labels": list(map(int, labels))}
            for name, scores in by_setting.items()]


def test_a_better_setting_gets_a_positive_interval_and_the_same_one_none():
    rng = np.random.default_rng(2)
    labels, scores = scored_set(rng)
    rows = rows_of(labels, {"defaults": scores, "same": scores.copy(),
                            "better": scores + 0.5 * labels})
    table = {r["setting"]: r for r in compare(rows, "defaults", 500, 0)}
    assert table["same"]["difference_interval"] == [0.0, 0.0]
    assert table["better"]["difference"] == pytest.approx(
        roc_auc_score(labels, scores + 0.5 * labels) - roc_auc_score(labels, scores), abs=1e-4)
    assert table["better"]["difference_interval"][0] > 0
    assert table["better"]["share_above"] > 0.95


def test_settings_scored_on_different_images_are_refused():
    rng = np.random.default_rng(3)
    labels, scores = scored_set(rng)
    rows = rows_of(labels, {"defaults": scores, "other": scores})
    rows[1]["test_labels"] = rows[1]["test_labels"][::-1]
    with pytest.raises(ValueError, match="different test images"):
        compare(rows, "defaults", 10, 0)
