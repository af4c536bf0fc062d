"""The anomaly map in a whitened metric of the finest stage, with the
defaults' own prototypes, measured on the real-data suite's sets.

PaDiM measures a patch's deviation in the metric of the normal patches'
covariance (Mahalanobis). Whitening the features before the clustering
(``bench_feature_maps.py``) improves some sets' maps and costs others' image
ranking; this keeps the defaults' prototypes and image score and changes the
anomaly map only: the distance ``|W x - W p_k|`` to the nearest prototype in
the metric of a fixed matrix ``W`` that whitens the finest backbone stage's
block of channels (the others as they are). Because ``W`` is linear, ``W p_k``
are the means of the same clusters in the whitened space: one clustering
serves both the image score and the map.

For each set of ``bench_suite.py`` (the suite's seeded subset of
``--max-train`` training images) the defaults are fitted once with the
plain map (``map_metric="euclidean"``, the default when this ran;
``random_state=--seed``); ``W`` comes from the stage's covariance ``S`` over
the training images' features as the network scores them (every 4th patch of
each image, after the 3 x 3 average and the per-image scale), shrunk towards
a multiple of the identity by ``lambda``: ``S_l = (1 - l) S + l tr(S)/c I``,
``W = S_l^(-1/2)`` scaled so that the stage keeps its total variance (only
the shape of its metric changes, not its weight against the other stages).
``identity`` is that fitted map (checked against ``anomaly_maps``);
``lambda=0.1`` is what ``map_metric="whitened"`` became.
Reported per set: pixel AUROC, AUPRO@0.3 and the image AUROC of the map's
maximum (the defaults' image score reads another map, which this does not
change).

    python benchmarks/bench_map_metric.py [--max-train 200] [--seed 0] [--sets NAME ...]

Writes benchmarks/results/map_metric.{json,md}; runs with other seeds merge
into them (the page shows the mean over the seeds run). Measures no time: it
may run beside other work.
"""
import json

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_cluster_spread import smoothed_maps  # noqa: E402
from bench_feature_maps import stage_whitening  # noqa: E402
from bench_suite import (  # noqa: E402
    _Set, find_sets, one_fit_run, results_with_command, write_variant_markdown)
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

#: the covariance's shrinkage towards a multiple of the identity; None: no whitening
SHRINKAGES = (None, 0.1, 0.3, 0.5)


def features(det, images):
    """The network's patch features of ``images``, batch by batch:
    ((n, C, h, w) tensor, model input size) pairs."""
    with torch.inference_mode():
        for _, batch in model_inputs(images, det.image_size, det.crop_size, 8):
            yield det.network_.embedding(batch), tuple(batch.shape[-2:])


def stage_covariance(det, images, channels):
    """Covariance of the first ``channels`` feature channels over every 4th
    patch of each training image, float64."""
    rows = []
    for f, _ in features(det, images):
        rows.append(f[:, :channels].permute(0, 2, 3, 1).reshape(-1, channels)[::4].double())
    return torch.cov(torch.cat(rows).T)


def nearest_distances(det, images, whitenings):
    """Each patch's distance to its nearest prototype in the metric of each
    of ``whitenings`` (applied to the first ``len(w)`` channels), one pass
    over ``images``: a list of (n, 1, h, w) tensors, and the model input's size."""
    metrics = []
    for w in whitenings:
        prototypes = torch.as_tensor(det.prototypes_).clone()
        prototypes[:, :len(w)] = prototypes[:, :len(w)] @ w.T
        metrics.append((w, prototypes, 0.5 * (prototypes * prototypes).sum(1)))
    out = [[] for _ in whitenings]
    for f, size in features(det, images):
        n, channels, height, width = f.shape
        patches = f.permute(0, 2, 3, 1).reshape(-1, channels)
        for (w, prototypes, half_sq), distances in zip(metrics, out):
            x = patches.clone()
            x[:, :len(w)] = x[:, :len(w)] @ w.T
            best = (x @ prototypes.T - half_sq).amax(1)
            d2 = (x * x).sum(1) - 2 * best
            distances.append(d2.clamp_min(0).sqrt().view(n, 1, height, width))
    return [torch.cat(d) for d in out], size


def main(argv=None):
    args, command = one_fit_run(__doc__, "bench_map_metric.py", argv)
    path = _common.RESULTS / "map_metric.json"
    # runs of several seeds merge, one command each
    stored = results_with_command(path, command)
    for name, folder in find_sets(args.sets).items():
        data = _Set(name, folder, args.max_train)
        # the plain map, the default when this ran: the whitened ones are measured here
        det = ProtoADDetector(backbone="efficientnet_lite0", map_metric="euclidean",
                              random_state=args.seed)
        det.fit(data.train)
        channels = det.network_.embedding.backbone.channels[0]
        covariance = stage_covariance(det, data.train, channels)
        masks = data.masks(det.image_size, det.crop_size)
        run = {"set": name, "seed": args.seed, "n_train": data.n_train}
        whitenings = [torch.eye(channels) if shrinkage is None
                      else stage_whitening(covariance, shrinkage).float()
                      for shrinkage in SHRINKAGES]
        by_metric, size = nearest_distances(det, data.test, whitenings)
        for shrinkage, distances in zip(SHRINKAGES, by_metric):
            maps = smoothed_maps(det, distances, size)
            if shrinkage is None:  # the fitted detector's own anomaly map
                np.testing.assert_allclose(maps, det.anomaly_maps(data.test),
                                           rtol=1e-4, atol=1e-4)
            run[_metric_name(shrinkage)] = {
                "pixel_auroc": round(float(pixel_auroc(masks, maps)), 4),
                "aupro": round(float(aupro(masks, maps)), 4),
                "image_auroc_map_max": round(float(image_auroc(
                    data.labels, maps.reshape(len(maps), -1).max(1))), 4),
            }
        print(json.dumps(run), flush=True)
        stored["runs"][f"{name}|{args.seed}|{data.n_train}"] = run
        _common.write_json(path, stored)
    _write_page(stored)


def _metric_name(shrinkage):
    return "identity" if shrinkage is None else f"lambda={shrinkage:g}"


def _write_page(stored):
    by_set = {}
    for run in stored["runs"].values():
        by_set.setdefault(run["set"], []).append(run)
    names = list(by_set)
    rows = []
    for key in map(_metric_name, SHRINKAGES):
        means = {n: {m: np.mean([r[key][m] for r in by_set[n]]) for m in by_set[n][0][key]}
                 for n in names}
        rows.append([key + (" (the defaults' map)" if key == "identity" else ""),
                     *(f"{means[n]['pixel_auroc']:.3f} / {means[n]['aupro']:.3f} / "
                       f"{means[n]['image_auroc_map_max']:.3f}" for n in names),
                     f"{np.mean([means[n]['pixel_auroc'] for n in names]):.3f} / "
                     f"{np.mean([means[n]['aupro'] for n in names]):.3f}"])
    runs = ", ".join(
        f"{n} {by_set[n][0]['n_train']} (seeds {','.join(str(r['seed']) for r in by_set[n])})"
        for n in names)
    write_variant_markdown(
        _common.RESULTS / "map_metric.md",
        "The anomaly map in a whitened metric of the finest stage (the defaults' prototypes)",
        stored,
        f"The defaults fitted once per set and seed (training images: {runs}); the map's "
        "distance measured with the finest stage's channels whitened, covariance shrunk by "
        "lambda (see the script). Each cell: pixel AUROC / AUPRO@0.3 / image AUROC of the "
        "map's maximum (not the defaults' image score), mean over the seeds; last column: "
        "mean pixel AUROC / AUPRO.",
        ["map metric", *names, f"mean of {len(names)}"], rows)


if __name__ == "__main__":
    main()
