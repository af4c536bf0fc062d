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

Writes benchmarks/results/synthetic_variants.{json,md}.
"""

import argparse
import json
from pathlib import Path

from skprotoad import ProtoADDetector
from skprotoad.datasets import (
    DEFECT_TYPES,
    load_masks,
    load_mvtec,
    make_defect_dataset,
    make_defect_images,
)
from skprotoad.metrics import evaluate_maps, image_auroc

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "magnetic_tile"
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
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "synthetic_variants.json").write_text(
        json.dumps({"rows": rows, "image_scores_by_defect_type": by_type}, indent=2))
    cols = ["data", "alignment", "neighborhood_size", "normalization", "image_score", "image_auroc", "pixel_auroc", "aupro", "pixel_f1_max"]
    lines = [
        "# Alignment, neighbourhood averaging and normalization",
        "",
        "Command: `python benchmarks/bench_synthetic_variants.py"
        + (f" --magnetic-tile {args.magnetic_tile}" if args.magnetic_tile else "") + "`",
        "",
        "efficientnet_lite0, k-means prototypes, sigma 4.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ] + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
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
    (out / "synthetic_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
