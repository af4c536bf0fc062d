"""Per-position statistics for the image score, PaDiM's way: subtract each
position's normal mean (the defaults' ``position_baseline``) and also divide
by its normal spread, measured on the real-data suite's sets.

For each set of ``bench_suite.py`` (the suite's seeded subset of
``--max-train`` training images), the defaults with
``position_baseline=False`` are fitted on 80 % of the training images
(``random_state=--seed``; a float ``contamination`` so that the fit runs no
calibration of its own); the other 20 % are scored as unseen normal images,
and their score maps at the patches' resolution (``|x| (1 - max cos)``, the
defaults' ``image_score="projection"``) give each position's mean ``m`` and
standard deviation ``s``. Every test image's score map ``x`` is then read
as the maximum of the smoothed, upsampled:

* ``plain``: ``x`` (``position_baseline=False``);
* ``mean``: ``x - m`` (the defaults' rule, from these held-out images);
* ``standardised``: ``(x - m) / s`` (PaDiM's per-position normalisation);
* ``standardised, spread floored``: ``(x - m) / max(s, median s)``;
* ``standardised, half``: ``(x - m) / sqrt(s median s)``;
* ``envelope``: ``x - max`` of the held-out maps at each position.

All rows read one fitted model per set, so their image AUROCs compare
readouts only.

    python benchmarks/bench_position_spread.py [--max-train 200] [--seed 0] [--sets NAME ...]

Writes benchmarks/results/position_spread.{json,md}. Run it alone or beside
other accuracy runs: it measures no time.
"""
import _common  # noqa: F401  (first: this checkout's skprotoad)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_suite import _Set, find_sets, one_fit_run, write_one_fit_results  # noqa: E402
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
from skprotoad.network import upsample  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

HELD_OUT = 0.2
READOUTS = ("plain", "mean", "standardised", "standardised, spread floored",
            "standardised, half", "envelope")


def score_patches(det, images):
    """(n, 1, h, w) score maps at the patches' resolution, and the input size."""
    net = det.network_
    out = []
    with torch.inference_mode():
        for _, batch in model_inputs(images, det.image_size, det.crop_size, 8):
            out.append(net.patch_scores(net.embedding(batch))[1])
    return torch.cat(out), tuple(batch.shape[-2:])


def image_values(det, patches, size):
    """Maximum of each smoothed, upsampled map, as the network reads it."""
    net = det.network_
    stride = net.embedding.backbone.strides[0]
    maps = net.smoothing(upsample(patches, stride, size, net.embedding.alignment)[:, 0])
    return maps.reshape(len(maps), -1).amax(1).numpy()


def readout_maps(test, held_out):
    """{readout: (n, 1, h, w)} of :data:`READOUTS` from the held-out maps' statistics."""
    mean, spread = held_out.mean(0, keepdim=True), held_out.std(0, keepdim=True)
    typical = spread.median()
    return {
        "plain": test,
        "mean": test - mean,
        "standardised": (test - mean) / spread.clamp_min(1e-12),
        "standardised, spread floored": (test - mean) / torch.maximum(spread, typical),
        "standardised, half": (test - mean) / torch.sqrt(spread * typical).clamp_min(1e-12),
        "envelope": test - held_out.amax(0, keepdim=True),
    }


def _subset(images, index):
    return [images[i] for i in index] if isinstance(images, list) else images[index]


def main(argv=None):
    args, command = one_fit_run(__doc__, "bench_position_spread.py", argv)
    results = {}
    for name, folder in find_sets(args.sets).items():
        data = _Set(name, folder, args.max_train)
        order = np.random.default_rng(args.seed).permutation(data.n_train)
        n_held = int(round(HELD_OUT * data.n_train))
        det = ProtoADDetector(backbone="efficientnet_lite0", position_baseline=False,
                              contamination=0.01, random_state=args.seed)
        det.fit(_subset(data.train, np.sort(order[n_held:])))
        held_out, size = score_patches(det, _subset(data.train, np.sort(order[:n_held])))
        test, _ = score_patches(det, data.test)
        plain = image_values(det, test, size)
        # the plain readout is the fitted detector's own image score
        np.testing.assert_allclose(plain, -det.score_samples(data.test), rtol=1e-4, atol=1e-6)
        results[name] = {
            key: round(float(image_auroc(data.labels, image_values(det, maps, size))), 4)
            for key, maps in readout_maps(test, held_out).items()
        }
        results[name].update(n_fit=data.n_train - n_held, n_held_out=n_held)
        print(name, results[name], flush=True)
    names = list(results)
    rows = []
    for key in READOUTS:
        values = [results[n][key] for n in names]
        rows.append([key, *(f"{v:.3f}" for v in values), f"{np.mean(values):.3f}"])
    write_one_fit_results(
        "position_spread", command, results,
        "Per-position mean and spread of the score map on the suite's sets",
        f"The defaults with `position_baseline=False` fitted once per set on "
        f"{1 - HELD_OUT:.0%} of its training images (seed {args.seed}; "
        + ", ".join(f"{n} {results[n]['n_fit']} / {results[n]['n_held_out']}" for n in names)
        + " fitted / held out); the held-out images' score maps give each position's "
        "mean and spread; image AUROC of each readout of the test images' maps.",
        ["readout", *names, f"mean of {len(names)}"], rows)


if __name__ == "__main__":
    main()
