"""Image-AUROC differences between settings on the same test images, with
the uncertainty that comes from the test images themselves.

    python benchmarks/bench_paired_auroc.py [--results PATH] [--against defaults]
        [--settings NAME ...] [--resamples 2000] [--random-state 0] [--name paired_auroc]

The suite's seed ranges say how far a setting's image AUROC moves with the
fit's randomness on one fixed test set. They do not say how far it would
move on other test images of the same kind, which is what a choice of
defaults should hold on: with 25 normal test images (tire), one normal image
that scores above most defective ones moves the AUROC by several points.

For every set, seed and setting of a suite results file whose rows carry
every test image's score (``bench_suite.py`` stores them as ``test_scores``
and ``test_labels``), this resamples the normal and the defective test
images separately, with replacement (a stratified bootstrap), computes every
setting's AUROC on each resample, and reports the difference to the
``--against`` setting on the same resample: the difference on the test set
as it is, the 2.5 / 97.5 % percentiles of the resampled differences (a 95 %
interval) and the share of resamples where the setting ranks better, and
each setting's own interval (``--settings``: only these, and the
``--against`` one). Results: ``benchmarks/results/NAME.{json,md}``.
"""

import argparse
import os
import sys

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402


def auroc_of_resamples(scores, labels, resamples):
    """AUROC of ``scores`` (higher: more anomalous) against ``labels`` (1:
    defective) on each resample, a (R, n) array of indices: Mann-Whitney
    from the ranks of every resample at once."""
    s = np.asarray(scores, dtype=np.float64)[resamples]
    y = np.asarray(labels)[resamples]
    ranks = rankdata(s, axis=1)  # ties get the mean rank
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    rank_sum = (ranks * y).sum(axis=1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def stratified_resamples(labels, n_resamples, rng):
    """(R, n) indices: each row draws as many normal and defective images as
    ``labels`` has, each class with replacement from its own images."""
    labels = np.asarray(labels)
    parts = []
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        parts.append(rng.choice(members, size=(n_resamples, len(members))))
    return np.concatenate(parts, axis=1)


def compare(rows, against, n_resamples, random_state):
    """Per (set, seed): every setting's AUROC with its interval, and its
    difference to ``against``'s on the same resamples."""
    groups = {}
    for row in rows:
        if "test_scores" in row:
            groups.setdefault((row["set"], row["seed"], row["n_train"]), {})[row["setting"]] = row
    out = []
    for (name, seed, n_train), by_setting in sorted(groups.items()):
        if against not in by_setting:
            continue
        labels = by_setting[against]["test_labels"]
        if any(r["test_labels"] != labels for r in by_setting.values()):
            raise ValueError(f"{name}, seed {seed}: the settings scored different test images")
        resamples = stratified_resamples(labels, n_resamples, np.random.default_rng(random_state))
        everything = np.arange(len(labels))[None]
        observed = {setting: float(auroc_of_resamples(row["test_scores"], labels, everything)[0])
                    for setting, row in by_setting.items()}
        resampled = {setting: auroc_of_resamples(row["test_scores"], labels, resamples)
                     for setting, row in by_setting.items()}
        for setting, own in resampled.items():
            base = resampled[against]
            out.append({
                "set": name, "seed": seed, "n_train": n_train, "setting": setting,
                "against": against, "n_normal": int(len(labels) - sum(labels)),
                "n_defective": int(sum(labels)), "image_auroc": round(observed[setting], 4),
                "interval": [round(float(v), 4) for v in np.percentile(own, [2.5, 97.5])],
                "difference": round(observed[setting] - observed[against], 4),
                "difference_interval": [round(float(v), 4)
                                        for v in np.percentile(own - base, [2.5, 97.5])],
                "share_above": round(float(np.mean(own > base)), 3),
            })
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(_common.RESULTS / "suite_scores.json"))
    parser.add_argument("--against", default="defaults")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=None,
                        help="compare only these settings (default: every one with scores)")
    parser.add_argument("--name", default="paired_auroc",
                        help="results file name, without extension")
    args = parser.parse_args(argv)
    rows = list(_common.read_json(args.results, {"runs": {}})["runs"].values())
    if args.settings is not None:
        rows = [r for r in rows if r.get("setting") in {*args.settings, args.against}]
    table = compare(rows, args.against, args.resamples, args.random_state)
    if not table:
        sys.exit(f"no rows with test_scores and setting {args.against!r} in {args.results}")
    command = "python benchmarks/bench_paired_auroc.py " + " ".join(argv or sys.argv[1:])
    _common.write_json(_common.RESULTS / f"{args.name}.json",
                       {"command": command.strip(), "rows": table}, indent=1)
    lines = [
        "# Image AUROC on the same test images: differences with their 95 % intervals",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Rows of `{os.path.relpath(args.results, _common.REPO)}` with every test image's "
        "score; stratified bootstrap "
        f"over the test images ({args.resamples} resamples, normal and defective images "
        f"each drawn with replacement from their own), every setting on the same "
        f"resamples. `difference`: the setting's image AUROC minus `{args.against}`'s on "
        "the test set as it is, and the 2.5-97.5 % percentiles of that difference over "
        "the resamples; `above`: share of resamples where the setting ranks better.",
        "",
    ]
    rows = []
    for r in table:
        low, high = r["interval"]
        d_low, d_high = r["difference_interval"]
        is_base = r["setting"] == args.against
        rows.append([r["set"], r["seed"], r["n_train"], f"{r['n_normal']} / {r['n_defective']}",
                     r["setting"],
                     f"{r['image_auroc']:.3f} ({low:.3f}-{high:.3f})",
                     "" if is_base else f"{r['difference']:+.3f} ({d_low:+.3f} to {d_high:+.3f})",
                     "" if is_base else f"{r['share_above']:.2f}"])
    lines += _common.markdown_table(
        ["set", "seed", "training images", "normal / defective", "setting",
         "image AUROC (95 % interval)",
         f"difference to {args.against} (95 % interval)", "above"], rows)
    _common.write_markdown(_common.RESULTS / f"{args.name}.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
