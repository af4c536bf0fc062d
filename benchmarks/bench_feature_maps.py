"""Linear maps of the patch features on the real-data suite (a lead, not taken).

    python benchmarks/bench_feature_maps.py [--sets NAME ...] [--variants NAME ...]
        [--seeds 0] [--max-train 200]

PaDiM scores a patch by its Mahalanobis distance, which weighs the feature
directions by how little normal patches vary along them. This runs the
default detector with a fixed linear map of its patch features, fitted on
each set's normal training patches, that the package does not offer:

- ``whiten0.1``, ``whiten0.3``, ``whiten0.7``, ``whiten0.9``: the joined
  features (not centred) times ``S^(-1/2)``, ``S`` their covariance shrunk
  towards a multiple of the identity by 0.1 to 0.9, before the per-image
  scale (PaDiM's geometry, shared by all positions; the stronger the
  shrinkage, the closer to the features as they are); ``whiten1.0``, a
  multiple of the identity that the per-image scale undoes, is the control:
  the defaults' results up to rounding;
- ``pca96``, ``pca64``: the per-image-scaled features projected onto their
  first 96 / 64 principal directions (uncentred second moment), as ``P^T P``
  so that the channels stay 176 (distances as in 96 / 64 coordinates: the
  accuracy of a head with that many channels, not its speed).

The map goes into :class:`skprotoad.network.PatchEmbedding` for the run
(``join`` or ``forward`` wrapped); ``bench_suite.run_one`` does the rest, so
``none`` is the suite's ``defaults`` row. Results:
``benchmarks/results/feature_maps.{json,md}``.
"""

import contextlib
import json

import _common  # first: this checkout's skprotoad

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_suite  # noqa: E402

from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.network import PatchEmbedding  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

VARIANTS = {
    "none": None,
    "whiten0.1": ("whiten", 0.1),
    "whiten0.3": ("whiten", 0.3),
    "whiten0.7": ("whiten", 0.7),
    "whiten0.9": ("whiten", 0.9),
    "whiten1.0": ("whiten", 1.0),
    "pca96": ("pca", 96),
    "pca64": ("pca", 64),
}


def _patches(data, step, after_scale):
    """Every ``step``-th patch feature of the training images, float64
    (joined, or after the per-image scale), as the default embedding gives them."""
    extractor = create_feature_extractor("efficientnet_lite0", (1, 2, 3))
    embedding = PatchEmbedding(extractor, neighborhood_size=3, normalization="image").eval()
    rows = []
    with torch.inference_mode():
        for _, batch in model_inputs(data.train, 256, None, 16):
            f = embedding(batch) if after_scale else embedding.join(batch)
            rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])[::step].double())
    return torch.cat(rows)


def training_statistic(data, kind):
    """What ``kind``'s maps are fitted to, from ``data``'s training patches:
    for ``"whiten"`` the covariance of the joined features (every 4th patch),
    for ``"pca"`` the second moment of the per-image-scaled ones (all)."""
    if kind == "whiten":
        return torch.cov(_patches(data, 4, after_scale=False).T)
    x = _patches(data, 1, after_scale=True)
    return x.T @ x / len(x)


def fitted_map(kind, value, statistic):
    """(where, C x C matrix) of the map ``kind`` with ``value`` (shrinkage or
    dimensions), from :func:`training_statistic`."""
    if kind == "whiten":
        n = statistic.shape[0]
        shrunk = ((1 - value) * statistic
                  + value * statistic.trace() / n * torch.eye(n, dtype=statistic.dtype))
        values, vectors = torch.linalg.eigh(shrunk)
        return "join", (vectors @ torch.diag(values.rsqrt()) @ vectors.T).float()
    _, vectors = torch.linalg.eigh(statistic)
    top = vectors[:, -value:]
    return "forward", (top @ top.T).float()


@contextlib.contextmanager
def mapped_features(where, matrix):
    """PatchEmbedding's ``where`` ("join" or "forward") followed by ``matrix``."""
    original = getattr(PatchEmbedding, where)

    def wrapped(self, images):
        return F.conv2d(original(self, images), matrix[:, :, None, None])

    setattr(PatchEmbedding, where, wrapped)
    try:
        yield
    finally:
        setattr(PatchEmbedding, where, original)


def main(argv=None):
    args, path, results = bench_suite.variant_run(__doc__, VARIANTS, "bench_feature_maps.py", "feature_maps", argv)
    for name, folder in bench_suite.find_sets(args.sets).items():
        data = bench_suite._Set(name, folder, args.max_train)
        statistics = {}  # one pass over the training images per kind of map
        for variant in args.variants:
            fitted = None
            if VARIANTS[variant] is not None:
                kind, value = VARIANTS[variant]
                if kind not in statistics:
                    statistics[kind] = training_statistic(data, kind)
                fitted = fitted_map(kind, value, statistics[kind])
            for seed in args.seeds:
                with mapped_features(*fitted) if fitted else contextlib.nullcontext():
                    row = bench_suite.run_one(data, "defaults", seed, None)
                keep = ("crop_image_auroc", "crop_pixel_auroc", "crop_aupro", "fpr", "tpr")
                row = {"set": name, "variant": variant, "seed": seed,
                       "n_train": data.n_train, **{k: row[k] for k in keep}}
                print(json.dumps(row), flush=True)
                results["runs"][f"{name}|{variant}|{seed}|{data.n_train}"] = row
                _common.write_json(path, results, indent=1)
                _write_markdown(results, args.out / "feature_maps.md")


def _write_markdown(results, path):
    runs = list(results["runs"].values())
    cells = {}
    for r in runs:
        cells.setdefault((r["set"], r["variant"]), []).append(r)
    variants = [v for v in VARIANTS if any(v == key[1] for key in cells)]
    rows = []
    for name in sorted({key[0] for key in cells}):
        row = [name]
        for v in variants:
            got = sorted(cells.get((name, v), []), key=lambda r: r["seed"])
            if not got:
                row.append("")
                continue
            mean = {k: sum(r[k] for r in got) / len(got)
                    for k in ("crop_image_auroc", "crop_pixel_auroc", "crop_aupro")}
            cell = " / ".join(f"{mean[k]:.3f}" for k in mean)
            if len(got) > 1:
                low, high = (f(r["crop_image_auroc"] for r in got) for f in (min, max))
                seeds = ",".join(str(r["seed"]) for r in got)
                cell += f" (image {low:.3f}-{high:.3f}, seeds {seeds})"
            row.append(cell)
        rows.append(row)
    lines = ["# Linear maps of the patch features (a lead, not taken)", "", "Commands:", ""]
    lines += [f"- `{c}`" for c in results["commands"]]
    lines += ["", f"Machine: {_common.machine()}. The default detector (efficientnet_lite0, "
              "whole image at 256 x 256) with a linear map of its patch features fitted on each "
              "set's normal training patches (see the script's docstring); seeded training "
              "subsets as in bench_suite. Each cell: image AUROC / pixel AUROC / AUPRO@0.3, mean "
              "over the seeds run (seed 0 alone unless listed).", ""]
    lines += _common.markdown_table(["set", *variants], rows)
    _common.write_markdown(path, lines)


if __name__ == "__main__":
    main()
