"""Choosing a setting from normal images alone: synthetic anomalies (a lead).

    python benchmarks/bench_synthetic_selection.py [--sets NAME ...]
        [--variants NAME ...] [--seeds 0] [--max-train 200]

No setting serves every suite set (the defaults page): the 3 x 3 average
helps the textures and tire, costs Magnetic Tile and the objects; whitening
stage 1 helps BSData and the textures, costs Magnetic Tile and tire. A user
has normal images only. This measures whether anomalies *made* on held-out
normal images rank the settings of one set as its real defects do.

For each set, seed and variant: the seeded training subset (as in
``bench_suite``) is read as the detector reads it (256 x 256), 80 % of it
fit, the other 20 % held out; four kinds of anomaly are made on each
held-out image (its own size-8-to-28 patch pasted elsewhere, ``cutpaste``;
a soft ellipse of another held-out image, ``other``; a soft ellipse
darkened or brightened by 40 %, ``shade``; a thin dark line, ``scratch``).
Rows: the image AUROC of the held-out images against their altered copies,
per kind and their mean, and the pixel AUROC of their maps with the made
anomalies' masks, next to the same fit's image and pixel AUROC on the set's
real test images. Variants: ``defaults``; ``reflect``
(``padding="reflect"``); ``nbhd1`` (``neighborhood_size=1``);
``whiten_stage1`` (``bench_feature_maps``' map of that name). Results:
``benchmarks/results/synthetic_selection.{json,md}``.
"""

import contextlib
import types

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import bench_feature_maps  # noqa: E402
import bench_suite  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import pixel_auroc  # noqa: E402
from skprotoad.preprocessing import load_image, resize_and_crop  # noqa: E402

SIZE = 256
VARIANTS = {
    "defaults": {},
    "reflect": {"padding": "reflect"},
    "nbhd1": {"neighborhood_size": 1},
    "whiten_stage1": "whiten_stage1",
}
KINDS = ("cutpaste", "other", "shade", "scratch")


def _read(images):
    """(n, SIZE, SIZE, 3) float32 in [0, 1], as the detector reads them."""
    return np.stack([resize_and_crop(load_image(x), SIZE, None).permute(1, 2, 0).numpy()
                     for x in images])


def _soft_ellipse(rng):
    cy, cx = rng.uniform(24, SIZE - 24, 2)
    ry, rx = rng.uniform(4, 14, 2)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.clip(1.5 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, 1)[..., None]


def synthetic_anomalies(clean, rng):
    """Each kind of anomaly made once on every image of ``clean``:
    ``{kind: (images, masks)}``."""
    made = {kind: ([], []) for kind in KINDS}

    def add(kind, image, mask):
        made[kind][0].append(image)
        made[kind][1].append(mask)

    for i, image in enumerate(clean):
        h, w = rng.integers(8, 28, 2)
        y0, x0, y1, x1 = rng.integers(8, SIZE - 36, 4)
        pasted = image.copy()
        pasted[y1:y1 + h, x1:x1 + w] = image[y0:y0 + h, x0:x0 + w]
        mask = np.zeros((SIZE, SIZE), bool)
        mask[y1:y1 + h, x1:x1 + w] = True
        add("cutpaste", pasted, mask)
        other = clean[(i + 1 + rng.integers(len(clean) - 1)) % len(clean)][::-1, ::-1]
        weight = _soft_ellipse(rng)
        add("other", image * (1 - weight) + other * weight, weight[..., 0] > 0.5)
        weight = _soft_ellipse(rng)
        add("shade", image * (1 - weight + weight * rng.choice([0.6, 1.4])),
            weight[..., 0] > 0.5)
        line = image.copy()
        mask = np.zeros((SIZE, SIZE), bool)
        y, x = rng.integers(30, SIZE - 30, 2)
        length, angle = rng.integers(15, 40), rng.uniform(0, np.pi)
        for s in np.linspace(0, length, 4 * length):
            r, c = int(y + s * np.sin(angle)), int(x + s * np.cos(angle))
            line[r:r + 2, c:c + 2] *= 0.5
            mask[r:r + 2, c:c + 2] = True
        add("scratch", line, mask)
    return {kind: (np.clip(np.stack(images), 0, 1).astype(np.float32), np.stack(masks))
            for kind, (images, masks) in made.items()}


def _variant(name, fit_images):
    """(detector parameters, context the fit and scoring run in)."""
    spec = VARIANTS[name]
    if isinstance(spec, dict):
        return spec, contextlib.nullcontext()
    kind, value, stage = bench_feature_maps.VARIANTS[spec]
    statistic = bench_feature_maps.training_statistic(types.SimpleNamespace(train=fit_images),
                                                      kind)
    return {}, bench_feature_maps.mapped_features(
        *bench_feature_maps.fitted_map(kind, value, statistic, stage))


def run(data, images, variant, seed):
    """One row: ``images`` are ``data``'s training images as :func:`_read` gives them."""
    order = np.random.default_rng(seed).permutation(len(images))
    n_fit = int(round(0.8 * len(images)))
    fit_images, held_out = images[np.sort(order[:n_fit])], images[np.sort(order[n_fit:])]
    made = synthetic_anomalies(held_out, np.random.default_rng(seed + 1))
    params, context = _variant(variant, fit_images)
    with context:
        det = ProtoADDetector(**{**bench_suite.COMMON, **params, "random_state": seed})
        det.fit(fit_images)
        clean_maps, clean = det.anomaly_maps(held_out, return_scores=True)
        no_defect = np.zeros(clean_maps.shape, bool)
        row = {}
        for kind, (altered, masks) in made.items():
            maps, scores = det.anomaly_maps(altered, return_scores=True)
            labels = np.r_[np.zeros(len(clean)), np.ones(len(altered))]
            row[kind] = float(roc_auc_score(labels, -np.r_[clean, scores]))
            row[f"{kind}_pixel"] = pixel_auroc(np.r_[no_defect, masks], np.r_[clean_maps, maps])
        row["synthetic"] = float(np.mean([row[k] for k in KINDS]))
        row["synthetic_pixel"] = float(np.mean([row[f"{k}_pixel"] for k in KINDS]))
        maps, scores = det.anomaly_maps(data.test, return_scores=True)
        row["real"] = float(roc_auc_score(data.labels, -scores))
        row["real_pixel"] = pixel_auroc(data.masks(det.image_size, det.crop_size), maps)
    return {"set": data.name, "variant": variant, "seed": seed, "n_fit": n_fit,
            "n_held_out": len(held_out), **{k: round(v, 4) for k, v in row.items()}}


def main(argv=None):
    args, path, results = bench_suite.variant_run(
        __doc__, VARIANTS, "bench_synthetic_selection.py", "synthetic_selection", argv)
    for name, folder in bench_suite.find_sets(args.sets).items():
        data = bench_suite._Set(name, folder, args.max_train)
        images = _read(data.train)
        for variant in args.variants:
            for seed in args.seeds:
                row = run(data, images, variant, seed)
                bench_suite.record_run(
                    results, path, f"{name}|{variant}|{seed}|{data.n_train}", row,
                    lambda results: _write_markdown(results, args.out / "synthetic_selection.md"))


def _write_markdown(results, path):
    runs = sorted(results["runs"].values(),
                  key=lambda r: (r["set"], list(VARIANTS).index(r["variant"]), r["seed"]))
    def cell(r, key):
        return f"{r[key]:.3f}" if key in r else ""

    rows = [[r["set"], r["variant"], r["seed"], *(cell(r, k) for k in KINDS),
             f"**{r['synthetic']:.3f}**", cell(r, "synthetic_pixel"), f"**{r['real']:.3f}**",
             cell(r, "real_pixel")] for r in runs]
    bench_suite.write_variant_markdown(
        path, "Synthetic anomalies on held-out normal images (a lead)", results,
        "The defaults (efficientnet_lite0, whole image at 256 x 256) under each variant, "
        "fitted on 80 % of each set's seeded training subset; image AUROC of the other 20 % "
        "against their copies with one made anomaly of each kind (see the script's "
        "docstring), their mean (`synthetic`), and the same fit's image AUROC on the set's "
        "real test images (`real`); `pixel`: pixel AUROC of the held-out images' maps with "
        "the made anomalies' masks (the mean over the kinds), and of the real test images' "
        "(the rows without it ran before it was measured).",
        ["set", "variant", "seed", *KINDS, "synthetic", "synthetic pixel", "real",
         "real pixel"], rows)


if __name__ == "__main__":
    main()
