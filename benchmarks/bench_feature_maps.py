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
- ``whiten_stage1``, ``whiten_stage2``, ``whiten_stage3``: as ``whiten0.1``
  on one backbone stage's channels only (a block of the joined features),
  the block then scaled back to the stage's own total variance, so that the
  stages keep their weights; the other stages' channels as they are;
- ``pca96``, ``pca64``: the per-image-scaled features projected onto their
  first 96 / 64 principal directions (uncentred second moment), as ``P^T P``
  so that the channels stay 176 (distances as in 96 / 64 coordinates: the
  accuracy of a head with that many channels, not its speed).

The map goes into :class:`skprotoad.network.PatchEmbedding` for the run
(``join`` or ``forward`` wrapped, and the network scoring through them);
``bench_suite.run_one`` does the rest, so
``none`` is the suite's ``defaults`` row. Results:
``benchmarks/results/feature_maps.{json,md}``.
"""

import contextlib

import _common  # first: this checkout's skprotoad

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_suite  # noqa: E402

from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.network import PatchEmbedding, ProtoADNetwork  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

VARIANTS = {
    "none": None,
    "whiten0.1": ("whiten", 0.1),
    "whiten0.3": ("whiten", 0.3),
    "whiten0.7": ("whiten", 0.7),
    "whiten0.9": ("whiten", 0.9),
    "whiten1.0": ("whiten", 1.0),
    "whiten_stage1": ("whiten", 0.1, 0),
    "whiten_stage2": ("whiten", 0.1, 1),
    "whiten_stage3": ("whiten", 0.1, 2),
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


def _whitening(covariance, shrinkage):
    n = covariance.shape[0]
    shrunk = ((1 - shrinkage) * covariance
              + shrinkage * covariance.trace() / n * torch.eye(n, dtype=covariance.dtype))
    values, vectors = torch.linalg.eigh(shrunk)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def stage_whitening(block, shrinkage):
    """The whitening of one stage's covariance ``block`` (shrunk by
    ``shrinkage``), scaled so that the stage's total variance stays its own:
    only the shape of its metric changes, not its weight against the other
    stages."""
    whitening = _whitening(block, shrinkage)
    return whitening * (block.trace() / (whitening @ block @ whitening).trace()).sqrt()


def fitted_map(kind, value, statistic, stage=None):
    """(where, C x C matrix) of the map ``kind`` with ``value`` (shrinkage or
    dimensions), from :func:`training_statistic`; ``stage``: whiten that
    backbone stage's block of channels only."""
    if kind == "whiten" and stage is None:
        return "join", _whitening(statistic, value).float()
    if kind == "whiten":
        channels = create_feature_extractor("efficientnet_lite0", (1, 2, 3)).channels
        a = sum(channels[:stage])
        b = a + channels[stage]
        matrix = torch.eye(statistic.shape[0], dtype=statistic.dtype)
        matrix[a:b, a:b] = stage_whitening(statistic[a:b, a:b], value)
        return "join", matrix.float()
    _, vectors = torch.linalg.eigh(statistic)
    top = vectors[:, -value:]
    return "forward", (top @ top.T).float()


@contextlib.contextmanager
def mapped_features(where, matrix):
    """PatchEmbedding's ``where`` ("join" or "forward") followed by ``matrix``,
    and the network's scoring through the joined features: on the CPU it
    would otherwise take the coarser stages' products at their own stride,
    past ``join`` and ``forward``, and score without the map."""
    original = getattr(PatchEmbedding, where)
    original_scoring = ProtoADNetwork.image_patch_scores

    def wrapped(self, images):
        return F.conv2d(original(self, images), matrix[:, :, None, None])

    def joined_scoring(self, images):
        return self.patch_scores(self.embedding(images))

    setattr(PatchEmbedding, where, wrapped)
    ProtoADNetwork.image_patch_scores = joined_scoring
    try:
        yield
    finally:
        setattr(PatchEmbedding, where, original)
        ProtoADNetwork.image_patch_scores = original_scoring


def main(argv=None):
    args, path, results = bench_suite.variant_run(__doc__, VARIANTS, "bench_feature_maps.py", "feature_maps", argv)
    for name, folder in bench_suite.find_sets(args.sets).items():
        data = bench_suite._Set(name, folder, args.max_train)
        statistics = {}  # one pass over the training images per kind of map
        for variant in args.variants:
            fitted = None
            if VARIANTS[variant] is not None:
                kind, value, *stage = VARIANTS[variant]
                if kind not in statistics:
                    statistics[kind] = training_statistic(data, kind)
                fitted = fitted_map(kind, value, statistics[kind], *stage)
            for seed in args.seeds:
                with mapped_features(*fitted) if fitted else contextlib.nullcontext():
                    row = bench_suite.run_one(data, "defaults", seed, None)
                keep = ("crop_image_auroc", "crop_pixel_auroc", "crop_aupro", "fpr", "tpr")
                row = {"set": name, "variant": variant, "seed": seed,
                       "n_train": data.n_train, **{k: row[k] for k in keep}}
                bench_suite.record_run(
                    results, path, f"{name}|{variant}|{seed}|{data.n_train}", row,
                    lambda results: _write_markdown(results, args.out / "feature_maps.md"))


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
    bench_suite.write_variant_markdown(
        path, "Linear maps of the patch features (a lead, not taken)", results,
        "The default detector (efficientnet_lite0, whole image at 256 x 256) with a linear map "
        "of its patch features fitted on each set's normal training patches (see the script's "
        "docstring); seeded training subsets as in bench_suite. Each cell: image AUROC / pixel "
        "AUROC / AUPRO@0.3, mean over the seeds run (seed 0 alone unless listed).",
        ["set", *variants], rows)


if __name__ == "__main__":
    main()
