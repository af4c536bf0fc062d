"""The anomaly map's distance divided by the nearest prototype's cluster spread,
a per-cluster scale (a step from nearest-prototype distances towards a
Gaussian mixture), measured on the real-data suite's sets.

For each set of ``bench_suite.py`` (the suite's seeded subset of
``--max-train`` training images) the defaults are fitted once, with the
plain map (``map_metric="euclidean"``, the default when this ran;
``random_state=--seed``). Each training patch's nearest prototype ``k`` and
distance ``d`` (as the anomaly map measures it: per-image-scaled features,
Euclidean distance) give each prototype's spread, the root mean square of
its patches' distances, shrunk towards the spread of all patches by ``m``
pseudo-patches: ``s_k = sqrt((sum d^2 + m g^2) / (n_k + m))``. Each test
patch's map value is then ``d / s_k^p``, smoothed and upsampled as the
network does. ``p = 0`` is the defaults' map (checked against
``anomaly_maps``); ``p = 1`` divides by the spread, ``p = 0.5`` by its square
root. Reported per set: pixel AUROC, AUPRO@0.3 and the image AUROC of the
map's maximum (the defaults' image score reads another map, the projection
map less the position baseline, which this does not change).

    python benchmarks/bench_cluster_spread.py [--max-train 200] [--seed 0] [--sets NAME ...]

Writes benchmarks/results/cluster_spread.{json,md}. Measures no time: it may
run beside other work.
"""
import _common  # noqa: F401  (first: this checkout's skprotoad)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_suite import _Set, find_sets, one_fit_run, write_one_fit_results  # noqa: E402
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from skprotoad.network import upsample  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

#: (p, m): the power of the spread and the pseudo-patches of its shrinkage.
SETTINGS = ((0.0, 0), (0.5, 10), (0.5, 100), (1.0, 10), (1.0, 100))


def nearest(det, images):
    """Each patch's distance to its nearest prototype and that prototype's
    index, (n, 1, h, w) each, and the model input's size."""
    prototypes = torch.as_tensor(det.prototypes_)
    half_sq = 0.5 * (prototypes * prototypes).sum(1)
    distances, indices = [], []
    with torch.inference_mode():
        for _, batch in model_inputs(images, det.image_size, det.crop_size, 8):
            features = det.network_.embedding(batch)
            n, channels, height, width = features.shape
            x = features.permute(0, 2, 3, 1).reshape(-1, channels)
            best, k = (x @ prototypes.T - half_sq).max(1)
            d2 = (x * x).sum(1) - 2 * best
            distances.append(d2.clamp_min(0).sqrt().view(n, 1, height, width))
            indices.append(k.view(n, 1, height, width))
    return torch.cat(distances), torch.cat(indices), tuple(batch.shape[-2:])


def smoothed_maps(det, patches, size):
    """(n, H, W) maps from (n, 1, h, w) patch values, as the network makes them."""
    net = det.network_
    stride = net.embedding.backbone.strides[0]
    with torch.inference_mode():
        return net.smoothing(upsample(patches, stride, size, net.embedding.alignment)[:, 0]).numpy()


def spreads(distances, indices, n_prototypes, m):
    """Each prototype's spread ``s_k``, shrunk towards all patches' by ``m``."""
    k, d2 = indices.flatten(), distances.flatten().double() ** 2
    counts = torch.bincount(k, minlength=n_prototypes).double()
    sums = torch.bincount(k, weights=d2, minlength=n_prototypes)
    overall = d2.mean()
    return ((sums + m * overall) / (counts + m)).sqrt().float()


def main(argv=None):
    args, command = one_fit_run(__doc__, "bench_cluster_spread.py", argv)
    results = {}
    for name, folder in find_sets(args.sets).items():
        data = _Set(name, folder, args.max_train)
        # the plain map, which this study rescales (the default when it ran)
        det = ProtoADDetector(backbone="efficientnet_lite0", map_metric="euclidean",
                              random_state=args.seed)
        det.fit(data.train)
        train_d, train_k, _ = nearest(det, data.train)
        test_d, test_k, size = nearest(det, data.test)
        masks = data.masks(det.image_size, det.crop_size)
        # p = 0 is the fitted detector's own anomaly map
        np.testing.assert_allclose(smoothed_maps(det, test_d, size), det.anomaly_maps(data.test),
                                   rtol=1e-4, atol=1e-4)
        results[name] = {"n_train": data.n_train, "n_prototypes": len(det.prototypes_)}
        for p, m in SETTINGS:
            scale = spreads(train_d, train_k, len(det.prototypes_), m)[test_k] ** p
            maps = smoothed_maps(det, test_d / scale, size)
            results[name][f"p={p:g}, m={m}"] = {
                "pixel_auroc": round(float(pixel_auroc(masks, maps)), 4),
                "aupro": round(float(aupro(masks, maps)), 4),
                "image_auroc_map_max": round(float(image_auroc(
                    data.labels, maps.reshape(len(maps), -1).max(1))), 4),
            }
        print(name, results[name], flush=True)
    names = list(results)
    rows = []
    for p, m in SETTINGS:
        key = f"p={p:g}, m={m}"
        cells = [results[n][key] for n in names]
        rows.append([key + (" (the defaults' map)" if p == 0 else ""),
                     *(f"{c['pixel_auroc']:.3f} / {c['aupro']:.3f} / {c['image_auroc_map_max']:.3f}"
                       for c in cells),
                     f"{np.mean([c['pixel_auroc'] for c in cells]):.3f} / "
                     f"{np.mean([c['aupro'] for c in cells]):.3f}"])
    write_one_fit_results(
        "cluster_spread", command, results,
        "The anomaly map divided by the nearest prototype's cluster spread",
        f"The defaults fitted once per set (seed {args.seed}; training images: "
        + ", ".join(f"{n} {results[n]['n_train']}" for n in names)
        + "); each cell: pixel AUROC / AUPRO@0.3 / image AUROC of the map's maximum "
        "(not the defaults' image score); last column: mean pixel AUROC / AUPRO.",
        ["map: d / s_k^p", *names, f"mean of {len(names)}"], rows)


if __name__ == "__main__":
    main()
