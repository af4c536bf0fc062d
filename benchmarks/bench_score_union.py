"""Image scores in two metrics at once: the plain one and a whitened one,
each standardised by the held-out normal images' scores, the larger counts.

For each set of ``bench_suite.py`` (the suite's seeded subset of
``--max-train`` training images) and each seed, the defaults are fitted with
``score_whitening`` 0, 0.5 and 1 (one clustering: the three fits learn the
same prototypes, whitening and folds); each fit's ``calibration_scores_``
(the held-out normal images' anomaly scores) give its scores' normal mean
and spread. Rows:

* ``s = 0`` (the defaults), ``s = 0.5``, ``s = 1``: one metric;
* ``max of s = 0, 1`` and ``max of s = 0, 0.5``: each test image's larger
  standardised score, ``max_s (score_s - mean_s) / std_s``, an image
  anomalous in either metric;
* ``sum of s = 0, 1``: the sum of the two standardised scores.

FPR / TPR: the test images' share above the split-conformal threshold of
the same combination of the held-out scores (pooled over the calibration
folds), for every row alike; for ``s = 0`` that is the detector's own
threshold, so its FPR / TPR are ``predict``'s.

    python benchmarks/bench_score_union.py [--max-train 200] [--seeds 0 1 2] [--sets NAME ...]
        [--name score_union]

``--max-train 0``: every training image. Writes
benchmarks/results/<name>.{json,md}. Run it alone or beside
other accuracy runs: it measures no time.
"""
import _common  # noqa: F401  (first: this checkout's skprotoad)

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from bench_suite import _Set, find_sets, write_one_fit_results  # noqa: E402
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
from skprotoad.thresholds import conformal_threshold  # noqa: E402

WHITENINGS = (0.0, 0.5, 1.0)
ROWS = {  # row -> (score_whitening values, how their standardised scores join)
    "s = 0 (defaults)": ((0.0,), None),
    "s = 0.5": ((0.5,), None),
    "s = 1": ((1.0,), None),
    "max of s = 0, 1": ((0.0, 1.0), np.maximum),
    "max of s = 0, 0.5": ((0.0, 0.5), np.maximum),
    "sum of s = 0, 1": ((0.0, 1.0), np.add),
}


def combined(scores, held_out, whitenings, join):
    """(test, held-out) scores of one row; one metric's as they are."""
    if join is None:
        return scores[whitenings[0]], held_out[whitenings[0]]

    def standardised(s, values):
        return (values - held_out[s].mean()) / held_out[s].std()

    first, second = whitenings
    return (join(standardised(first, scores[first]), standardised(second, scores[second])),
            join(standardised(first, held_out[first]), standardised(second, held_out[second])))


def main(argv=None):
    with tempfile.TemporaryDirectory(prefix="score_union_") as cache:
        _run(argv, cache)


def _run(argv, cache):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", default=None)
    parser.add_argument("--name", default="score_union",
                        help="results file name in benchmarks/results (without suffix)")
    args = parser.parse_args(argv)
    command = (f"python benchmarks/bench_score_union.py --max-train {args.max_train} --seeds "
               + " ".join(map(str, args.seeds))
               + (" --sets " + " ".join(args.sets) if args.sets else "")
               + (f" --name {args.name}" if args.name != "score_union" else ""))
    results = {}
    for name, folder in find_sets(args.sets).items():
        data = _Set(name, folder, args.max_train)
        results[name] = {"n_train": data.n_train, "rows": {row: [] for row in ROWS}}
        for seed in args.seeds:
            scores, held_out = {}, {}
            for s in WHITENINGS:
                # the three fits extract the same features: once, from the cache
                det = ProtoADDetector(score_whitening=s, random_state=seed,
                                      memory=cache).fit(data.train)
                scores[s] = -det.score_samples(data.test)
                held_out[s] = np.asarray(det.calibration_scores_, dtype=float)
            for row, (whitenings, join) in ROWS.items():
                test, calibration = combined(scores, held_out, whitenings, join)
                threshold = conformal_threshold(calibration)
                flagged = test > threshold
                results[name]["rows"][row].append({
                    "seed": seed,
                    "image_auroc": round(float(image_auroc(data.labels, test)), 4),
                    "fpr": round(float(flagged[data.labels == 0].mean()), 4),
                    "tpr": round(float(flagged[data.labels == 1].mean()), 4),
                })
            print(name, seed, {row: v[-1] for row, v in results[name]["rows"].items()},
                  flush=True)
    names = list(results)
    table = []
    for row in ROWS:
        cells, means = [], []
        for n in names:
            runs = results[n]["rows"][row]
            per_seed = [r["image_auroc"] for r in runs]
            means.append(np.mean(per_seed))
            cells.append(f"{np.mean(per_seed):.3f} ({', '.join(f'{v:.3f}' for v in per_seed)}); "
                         f"{100 * np.mean([r['fpr'] for r in runs]):.1f} % / "
                         f"{100 * np.mean([r['tpr'] for r in runs]):.0f} %")
        table.append([row, *cells, f"{np.mean(means):.3f}"])
    write_one_fit_results(
        args.name, command, results,
        "The image score in two metrics at once, each standardised by the held-out normal scores",
        "The defaults fitted with score_whitening 0, 0.5 and 1 per set and seed (seeds "
        + ", ".join(map(str, args.seeds)) + "; training images: "
        + ", ".join(f"{n} {results[n]['n_train']}" for n in names)
        + "). Each cell: image AUROC, mean (per seed); FPR / TPR at the conformal threshold "
        "of the held-out scores combined alike.",
        ["row", *names, f"mean of {len(names)} (image AUROC)"], table)


if __name__ == "__main__":
    main()
