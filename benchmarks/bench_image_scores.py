"""How to read an image's score from the prototypes, measured on magnetic_tile.

The default embedding (efficientnet_lite0, stages 1..3, 3x3 aggregation,
features divided by each image's mean patch norm; resize 256 / crop 224) of
all training and test images is computed once. For each FINCH prototype set
(``--n-clusters``, ``--seeds``) every test patch gets ``c = 1 - max cosine``
to the prototypes, its norm ``n = |x|`` (relative to its image's mean), the
norm ``p`` of its best prototype and its distance ``d`` to the nearest
prototype; each readout below is upsampled, smoothed (sigma 4) and maximised
per image, as :class:`~skprotoad.network.ProtoADNetwork` does, and ranked by
image AUROC, overall and per defect type:

* ``distance``: ``d`` (``image_score="map"``);
* ``cosine``: ``c`` (``image_score="cosine"``, the paper's ranking);
* ``projection``: ``n c = |x| - max_k x.p_k / |p_k|`` (``image_score="projection"``);
* ``n^a c`` for other powers ``a``, ``p c``, ``n sqrt(2 c)`` (the distance to
  the best prototype's ray at the patch's own norm), ``n sin`` (to its line),
  and ``projection`` with sigma 8: the alternatives that were not kept.

It also writes a diagnostic of why the cosine readout ranks normal tiles
high: the relative norm of the patch where each normal / defective test
image's cosine map peaks, and ``1 - max cosine`` of the normal test patches by
their relative norm.

    python benchmarks/bench_image_scores.py [--seeds 0 1 2] [--n-clusters 2000 1000]

Writes benchmarks/results/image_scores.{json,md}. Data: Y. Huang, C. Qiu,
K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer 36,
85-96 (2020).
"""

import argparse
import json
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.clustering import learn_prototypes  # noqa: E402
from skprotoad.datasets import load_mvtec  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
from skprotoad.network import GaussianSmoothing, PatchEmbedding, upsample  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

DEFAULT_DATA = _common.data_dir("magnetic_tile")
SIZE, CROP, STRIDE = 256, 224, 4


def embed(paths):
    """(N, h, w, C) float32 patch features with the detector's default embedding."""
    d = ProtoADDetector()
    embedding = PatchEmbedding(
        create_feature_extractor("efficientnet_lite0", d.layers), mean=d.mean, std=d.std,
        alignment=d.alignment, neighborhood_size=d.neighborhood_size,
        normalization=d.normalization,
    ).eval()
    out = []
    with torch.inference_mode():
        for _, batch in model_inputs(paths, SIZE, CROP, batch_size=16):
            out.append(embedding(batch).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def patch_statistics(features, prototypes, block=16):
    """Per test patch: 1 - max cosine, |x|, |p| of the best prototype, distance."""
    P = torch.from_numpy(prototypes)
    unit, norms = F.normalize(P, dim=1), P.norm(dim=1)
    half_sq = 0.5 * norms**2
    parts = {"c": [], "n": [], "p": [], "d": []}
    with torch.inference_mode():
        for i in range(0, len(features), block):
            x = torch.from_numpy(features[i : i + block])
            n = x.norm(dim=-1)
            cos, best = (x @ unit.T).div_(n[..., None].clamp_min(1e-12)).max(dim=-1)
            d2 = (x * x).sum(-1) - 2 * (x @ P.T - half_sq).amax(dim=-1)
            parts["c"].append(1 - cos)
            parts["n"].append(n)
            parts["p"].append(norms[best])
            parts["d"].append(d2.clamp_min(0).sqrt())
    return {k: torch.cat(v) for k, v in parts.items()}


def image_scores(patch_scores, sigma=4.0, block=64):
    smooth = GaussianSmoothing(sigma, (CROP, CROP))
    out = []
    with torch.inference_mode():
        for i in range(0, len(patch_scores), block):
            up = upsample(patch_scores[i : i + block, None], STRIDE, (CROP, CROP), "center")
            out.append(smooth(up[:, 0]).flatten(1).amax(dim=1))
    return torch.cat(out).numpy()


def readouts(s):
    c, n, p, d = s["c"], s["n"], s["p"], s["d"]
    return {
        "distance": (d, 4.0),
        "cosine": (c, 4.0),
        "projection": (n * c, 4.0),
        "n^0.5 c": (n.sqrt() * c, 4.0),
        "n^1.5 c": (n**1.5 * c, 4.0),
        "n^2 c": (n**2 * c, 4.0),
        "p c": (p * c, 4.0),
        "n sqrt(2c)": (n * (2 * c).sqrt(), 4.0),
        "n sin": (n * (1 - (1 - c) ** 2).clamp_min(0).sqrt(), 4.0),
        "projection, sigma 8": (n * c, 8.0),
    }


def aurocs(labels, types, scores):
    result = {"all": image_auroc(labels, scores)}
    for t in sorted(set(types) - {"good"}):
        keep = (types == t) | (types == "good")
        result[t] = image_auroc(labels[keep], scores[keep])
    return {k: round(float(v), 4) for k, v in result.items()}


def diagnostic(labels, s):
    """Where the cosine map of a normal test image peaks: at weak patches."""
    c, n = s["c"].flatten(1), s["n"].flatten(1)
    at_peak = n.gather(1, c.argmax(dim=1, keepdim=True))[:, 0].numpy()
    normal = labels == 0
    cn, nn = c[torch.from_numpy(normal)].flatten(), n[torch.from_numpy(normal)].flatten()
    bins = [(0.0, 0.8), (0.8, 1.0), (1.0, 1.2), (1.2, 1.5), (1.5, np.inf)]
    by_norm = []
    for lo, hi in bins:
        keep = (nn >= lo) & (nn < hi)
        by_norm.append({
            "relative_norm": f"[{lo}, {hi})",
            "share_of_patches": round(float(keep.float().mean()), 3),
            "mean_1_minus_cos": round(float(cn[keep].mean()), 4),
            "p99_1_minus_cos": round(float(torch.quantile(cn[keep][::7], 0.99)), 4),
        })
    return {
        "median_norm_at_cosine_peak_normal": round(float(np.median(at_peak[normal])), 3),
        "median_norm_at_cosine_peak_defective": round(float(np.median(at_peak[~normal])), 3),
        "corr_1_minus_cos_and_norm_normal_patches": round(
            float(np.corrcoef(cn[::7].numpy(), nn[::7].numpy())[0, 1]), 3),
        "by_norm": by_norm,
    }


def write(results, out):
    _common.write_json(out / "image_scores.json", results)
    rows = results["rows"]
    types = [k for k in rows[0]["image_auroc"] if k != "all"]
    lines = [
        "# Image-score readouts on magnetic_tile",
        "",
        f"Command: `{results['command']}`",
        "",
        "efficientnet_lite0, default embedding (3x3 aggregation, per-image scale), "
        f"FINCH prototypes on {results['n_train']} training images, "
        f"{results['n_test']} test images; image AUROC. The defect-type columns: that "
        "type against all normal test images, mean over the seeds.",
        "",
        "| readout | prototypes | " + " | ".join(f"seed {s}" for s in results["seeds"])
        + " | mean | " + " | ".join(types) + " |",
        "|" + "---|" * (len(results["seeds"]) + 3 + len(types)),
    ]
    keys = list(dict.fromkeys((r["readout"], r["n_clusters"]) for r in rows))
    for name, n_clusters in sorted(keys, key=lambda k: (-k[1], keys.index(k))):
        mine = [r for r in rows if (r["readout"], r["n_clusters"]) == (name, n_clusters)]
        cells = [f"{r['image_auroc']['all']:.3f}" for r in mine]
        cells += [""] * (len(results["seeds"]) - len(cells))
        mean = np.mean([r["image_auroc"]["all"] for r in mine])
        per_type = [np.mean([r["image_auroc"][t] for r in mine]) for t in types]
        lines.append(f"| {name} | {n_clusters} | " + " | ".join(cells) + f" | **{mean:.3f}** | "
                     + " | ".join(f"{v:.3f}" for v in per_type) + " |")
    lines += ["", "## Diagnostic (first prototype set)", ""]
    diag = results["diagnostic"]
    lines += [f"- {k}: {v}" for k, v in diag.items() if k != "by_norm"]
    lines += ["", "| relative norm | share of normal test patches | mean 1 - cos | "
              "99th percentile |", "|---|---|---|---|"]
    lines += [f"| {b['relative_norm']} | {b['share_of_patches']} | {b['mean_1_minus_cos']} | "
              f"{b['p99_1_minus_cos']} |" for b in diag["by_norm"]]
    _common.write_markdown(out / "image_scores.md", lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-clusters", type=int, nargs="+", default=[2000, 1000])
    parser.add_argument("--train-step", type=int, default=1,
                        help="every N-th training image (quick runs)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    data = load_mvtec(args.data)
    labels = np.asarray(data.test_labels)
    types = np.asarray(data.test_defect_types)
    start = time.perf_counter()
    train, test = embed(data.train_paths[:: args.train_step]), embed(data.test_paths)
    print(f"features in {time.perf_counter() - start:.0f} s", flush=True)
    results = {
        "command": "python benchmarks/bench_image_scores.py --seeds "
        + " ".join(map(str, args.seeds)) + " --n-clusters "
        + " ".join(map(str, args.n_clusters))
        + (f" --train-step {args.train_step}" if args.train_step > 1 else ""),
        "n_train": len(train), "n_test": len(test), "seeds": args.seeds, "rows": [],
    }
    patches = train.reshape(-1, train.shape[-1])
    for n_clusters in args.n_clusters:
        for seed in args.seeds:
            prototypes = learn_prototypes(patches, method="finch", n_clusters=n_clusters,
                                          random_state=seed, normalize=False)
            stats = patch_statistics(test, prototypes)
            if not results["rows"]:
                results["diagnostic"] = diagnostic(labels, stats)
            for name, (patch_scores, sigma) in readouts(stats).items():
                row = {"readout": name, "n_clusters": n_clusters, "seed": seed,
                       "image_auroc": aurocs(labels, types, image_scores(patch_scores, sigma))}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            write(results, args.out)
    return results


if __name__ == "__main__":
    main()
