"""Alignment, neighbourhood averaging and normalization, measured side by side.

Fits one detector per setting (alignment="paper" = the reference join,
"center" = receptive-field centres; neighborhood_size 1 or 3; normalization
"patch" or "image", the latter with image scores from its map ("map") or from
the cosine ("cosine") or projection ("projection") readout) on generated
defect images (128 px, the demo's generator) and, with ``--magnetic-tile N``,
on every N-th training image of the real Magnetic Tile data, and reports
image/pixel AUROC and AUPRO.

    python benchmarks/bench_synthetic_variants.py [--magnetic-tile 4]

A second table ranks larger test sets of one defect type each (two generator
seeds, 120 images each, half defective) by each image score of the
per-image normalisation, with the default 3 x 3 aggregation.

Writes benchmarks/results/synthetic_variants.{json,md} (``--out`` another folder).
"""

import argparse
import json
from pathlib import Path

import _common  # first: this checkout's skprotoad

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.datasets import (  # noqa: E402
    DEFECT_TYPES,
    load_masks,
    load_mvtec,
    make_defect_dataset,
    make_defect_images,
)
from skprotoad.metrics import evaluate_maps, image_auroc  # noqa: E402

DATA = _common.data_dir("magnetic_tile")
SETTINGS = [("paper", 1, "patch", "map"), ("center", 1, "patch", "map"),
            ("center", 3, "patch", "map"), ("center", 1, "image", "map"),
            ("center", 3, "image", "map"), ("center", 1, "image", "cosine"),
            ("center", 3, "image", "cosine"), ("center", 1, "image", "projection"),
            ("center", 3, "image", "projection")]


def evaluate(det, X_train, X_test, labels, masks):
    det.fit(X_train)
    maps = det.anomaly_maps(X_test)
    scores = -det.score_samples(X_test)
    if masks is None:
        return maps, scores
    return {k: round(v, 4) for k, v in evaluate_maps(labels, scores, masks, maps).items()}


def image_scores_by_defect_type(seeds=(0, 1)):
    """Image AUROC of each image score on one defect type at a time."""
    rows = []
    for seed in seeds:
        X_train, _, _ = make_defect_images(40, (128, 128), 0.0, random_state=100 + seed)
        tests = {t: make_defect_images(120, (128, 128), 0.5, defect_types=(t,),
                                       random_state=200 + seed)[:2] for t in DEFECT_TYPES}
        for image_score in ("map", "cosine", "projection"):
            det = ProtoADDetector(
                image_size=128, crop_size=128, clustering="kmeans", n_clusters=200,
                image_score=image_score, random_state=0,
            ).fit(X_train)
            row = {"seed": seed, "image_score": image_score}
            for t, (X, y) in tests.items():
                row[t] = round(image_auroc(y, -det.score_samples(X)), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--magnetic-tile", type=int, default=0, metavar="STEP")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    rows = []
    synth = make_defect_dataset(n_train=40, n_test=40, image_size=(128, 128), random_state=0)
    for alignment, size, norm, image_score in SETTINGS:
        det = ProtoADDetector(
            image_size=128, crop_size=128, clustering="kmeans", n_clusters=200,
            alignment=alignment, neighborhood_size=size, normalization=norm,
            image_score=image_score, random_state=0,
        )
        r = evaluate(det, synth.X_train, synth.X_test, synth.y_test, synth.masks_test)
        rows.append({"data": "synthetic 128 px (40 train, 40 test)", "alignment": alignment,
                     "neighborhood_size": size, "normalization": norm,
                     "image_score": image_score, **r})
        print(json.dumps(rows[-1]), flush=True)
    if args.magnetic_tile:
        data = load_mvtec(DATA)
        masks = load_masks(data.test_mask_paths, 256, 224)
        train = data.train_paths[:: args.magnetic_tile]
        for alignment, size, norm, image_score in SETTINGS:
            det = ProtoADDetector(
                clustering="kmeans", n_clusters=500, alignment=alignment,
                neighborhood_size=size, normalization=norm, image_score=image_score,
                random_state=0,
            )
            r = evaluate(det, train, data.test_paths, data.test_labels, masks)
            rows.append({"data": f"magnetic_tile ({len(train)} train, all test)",
                         "alignment": alignment, "neighborhood_size": size,
                         "normalization": norm, "image_score": image_score, **r})
            print(json.dumps(rows[-1]), flush=True)
    by_type = image_scores_by_defect_type()
    out = args.out
    _common.write_json(out / "synthetic_variants.json",
                       {"rows": rows, "image_scores_by_defect_type": by_type})
    cols = ["data", "alignment", "neighborhood_size", "normalization", "image_score", "image_auroc", "pixel_auroc", "aupro", "pixel_f1_max"]
    lines = [
        "# Alignment, neighbourhood averaging and normalization",
        "",
        "Command: `python benchmarks/bench_synthetic_variants.py"
        + (f" --magnetic-tile {args.magnetic_tile}" if args.magnetic_tile else "") + "`",
        "",
        "efficientnet_lite0, k-means prototypes, sigma 4.",
        "",
    ] + _common.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    lines += [
        "",
        "## Image scores by defect type",
        "",
        "Defaults (per-image normalisation, 3 x 3 aggregation), 128 px, k-means 200, "
        "40 training images; 120 test images of one defect type each (half defective); "
        "image AUROC per generator seed.",
        "",
        "| seed | image_score | " + " | ".join(DEFECT_TYPES) + " |",
        "|" + "---|" * (2 + len(DEFECT_TYPES)),
    ] + [f"| {r['seed']} | {r['image_score']} | " + " | ".join(str(r[t]) for t in DEFECT_TYPES)
         + " |" for r in by_type]
    _common.write_markdown(out / "synthetic_variants.md", lines)


if __name__ == "__main__":
    main()
