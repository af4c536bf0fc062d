"""Which number of the score map should stand for the image: the maximum, a
top-k mean or the mean, measured on the real-data suite's sets.

For each set of ``bench_suite.py`` (the shared sets found and the generated
ones; the suite's seeded subset of ``--max-train`` training images), the
defaults are fitted once (``random_state=--seed``); each test image's
smoothed score map (``image_score="projection"``: ``|x| (1 - max cos)``) is
read three ways, each summarised by its maximum, the mean of its top
``q`` % of pixels (``q`` in :data:`TOP_SHARES`) and its mean:

* ``baselined``: less the held-out images' mean map (the defaults'
  ``position_baseline=True``; its maximum is the defaults' image score,
  checked against ``score_samples``);
* ``plain``: the score map itself (``position_baseline=False``'s maximum);
* ``anomaly map``: the distance map that the masks use
  (``image_score="map"``'s maximum).

The maps are the same in every row: only the number read from them differs,
so each row's image AUROC compares readouts on one fitted model.

    python benchmarks/bench_image_readouts.py [--max-train 200] [--seed 0] [--sets NAME ...]

Writes benchmarks/results/image_readouts.{json,md}. Run it alone or beside
other accuracy runs: it measures no time.
"""
import _common  # noqa: F401  (first: this checkout's skprotoad)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_suite import _Set, find_sets, one_fit_run, write_one_fit_results  # noqa: E402
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
from skprotoad.network import on_grid, upsample  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

TOP_SHARES = (0.1, 0.5, 1, 2, 5, 10)  # percent of an image's pixels
MAPS = ("baselined", "plain", "anomaly map")


def score_maps(det, images):
    """{way: (n, H, W) float32} of :data:`MAPS` and the network's own image
    scores, from the fitted detector's public network."""
    net = det.network_
    stride = net.embedding.backbone.strides[0]
    out = {way: [] for way in MAPS}
    own = []
    with torch.inference_mode():
        for _, batch in model_inputs(images, det.image_size, det.crop_size, 8):
            size = tuple(batch.shape[-2:])
            map_patches, score_patches = net.patch_scores(net.embedding(batch))
            maps, scores = net.readout(map_patches, score_patches, size)
            height, width = score_patches.shape[-2:]
            baselined = score_patches - on_grid(net.score_baseline, int(height), int(width))
            for way, patches in (("baselined", baselined), ("plain", score_patches)):
                out[way].append(net.smoothing(
                    upsample(patches, stride, size, net.embedding.alignment)[:, 0]).numpy())
            out["anomaly map"].append(maps.numpy())
            own.append(scores.numpy())
    return {way: np.concatenate(v) for way, v in out.items()}, np.concatenate(own)


def readouts(maps):
    """{readout: (n,) image values} of (n, H, W) maps."""
    flat = -np.sort(-maps.reshape(len(maps), -1), axis=1)  # descending
    values = {"max": flat[:, 0]}
    for share in TOP_SHARES:
        values[f"top {share:g} %"] = flat[:, : max(1, int(share / 100 * flat.shape[1]))].mean(1)
    values["mean"] = flat.mean(1)
    return values


def main(argv=None):
    args, command = one_fit_run(__doc__, "bench_image_readouts.py", argv)
    results = {}
    for name, folder in find_sets(args.sets).items():
        data = _Set(name, folder, args.max_train)
        det = ProtoADDetector(backbone="efficientnet_lite0", random_state=args.seed)
        det.fit(data.train)
        maps, own = score_maps(det, data.test)
        # the baselined map's maximum is the detector's image score
        np.testing.assert_allclose(maps["baselined"].reshape(len(own), -1).max(1), own,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(-det.score_samples(data.test), own, rtol=1e-5, atol=1e-6)
        results[name] = {
            way: {k: round(float(image_auroc(data.labels, v)), 4)
                  for k, v in readouts(maps[way]).items()}
            for way in MAPS
        }
        results[name]["n_train"] = data.n_train
        print(name, results[name], flush=True)
    names = list(results)
    keys = list(results[names[0]][MAPS[0]])
    rows = []
    for way in MAPS:
        for key in keys:
            values = [results[n][way][key] for n in names]
            rows.append([way, key, *(f"{v:.3f}" for v in values), f"{np.mean(values):.3f}"])
    write_one_fit_results(
        "image_readouts", command, results,
        "Image readouts of the defaults' score map on the suite's sets",
        f"The defaults fitted once per set (seed {args.seed}; training images: "
        + ", ".join(f"{n} {results[n]['n_train']}" for n in names)
        + "); image AUROC of each readout of each test image's map. `baselined` / `max` is "
        "the defaults' image score.",
        ["map", "readout", *names, f"mean of {len(names)}"], rows)


if __name__ == "__main__":
    main()
