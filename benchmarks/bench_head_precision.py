"""The prototype head searched in bfloat16, its chosen prototypes rescored in float32.

A lead for issue #20 (the head costs more than the backbone): the 1 x 1
convolution against every prototype is a search for two maxima per patch
(the nearest prototype, the largest projection). This script runs that
search in bfloat16 (the convolution and the two argmaxes; this CPU has
AVX512-BF16) and recomputes, in float32, the distance to the prototype it
chose and the projection onto the direction it chose, so that the values
are float32 values of real prototypes, only the choice can differ where two
prototypes are nearly tied. Against the float32 head it reports:

- time of the head's patch scores alone (the part that changes), and of the
  backbone for scale, at batch 1 and 16, interleaved over rounds (fastest
  round kept);
- how often the choice differs, and how much that moves patch values and
  image scores (the defaults' image score, with the position baseline).

The detector is the package's defaults with the plain map
(``map_metric="euclidean"``, the default when this ran) fitted on a subset of
Magnetic Tile (or the generated textures without the shared data).

    python benchmarks/bench_head_precision.py [--max-train 100] [--rounds 3] [--out DIR]

Writes DIR/head_precision.{json,md} (default benchmarks/results). Not in the
package: on this machine's CPU and torch the bfloat16 head measured slower
than the float32 one (the passes over the bfloat16 product and its two
maxima cost more than the product saves), see the results file.
"""
import argparse
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_speed import load_data, throughput  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402

N_TEST = 64


def bf16_patch_scores(network, features):
    """What ``network.patch_scores`` returns (normalization="image",
    image_score="projection"), the two searches in bfloat16."""
    n, c, h, w = features.shape
    # (N h w, C) rows: the 1 x 1 convolution as one matrix product
    x = features.permute(0, 2, 3, 1).reshape(-1, c)
    prototypes = network.prototypes
    half_sq = 0.5 * (prototypes * prototypes).sum(dim=1)
    inverse_norms = (2.0 * half_sq).clamp_min(1e-24).rsqrt()
    dots = x.bfloat16() @ prototypes.T.bfloat16()
    # max(...).indices: torch's bfloat16 argmax kernel is several times slower
    nearest = (dots - half_sq.bfloat16()).max(dim=1).indices
    along = dots.mul_(inverse_norms.bfloat16()).max(dim=1).indices
    distances = (x - prototypes[nearest]).norm(dim=1)
    projection = (x * prototypes[along]).sum(dim=1) * inverse_norms[along]
    return (distances.reshape(n, 1, h, w),
            (x.norm(dim=1) - projection).reshape(n, 1, h, w))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    name, train, test, labels = load_data(args.max_train, N_TEST)
    # the plain map, which bf16_patch_scores computes (the default when this ran)
    det = ProtoADDetector(map_metric="euclidean", random_state=0).fit(train)
    network = det.network_
    with torch.inference_mode():
        batches = [b for _, b in model_inputs(test, det.image_size, det.crop_size, 16)]
        features = torch.cat([network.embedding(b) for b in batches])
        exact = network.patch_scores(features)
        fast = bf16_patch_scores(network, features)
        baseline = network.score_baseline if network.score_baseline.numel() else None
        size = network.input_size
        scores = {kind: network.image_scores(patches[1], size, baseline).numpy()
                  for kind, patches in (("float32", exact), ("bfloat16 search", fast))}
    d32, d16 = exact[0].flatten(), fast[0].flatten()
    s32, s16 = exact[1].flatten(), fast[1].flatten()
    agreement = {
        "patches": int(d32.numel()),
        "distance_max_abs_diff": float((d16 - d32).abs().max()),
        "distance_share_changed": float(((d16 - d32).abs() > 1e-6).float().mean()),
        "distance_median": float(d32.median()),
        "score_patch_max_abs_diff": float((s16 - s32).abs().max()),
        "score_patch_share_changed": float(((s16 - s32).abs() > 1e-6).float().mean()),
        "image_score_max_abs_diff": float(np.abs(scores["bfloat16 search"] - scores["float32"]).max()),
        "image_score_std": float(scores["float32"].std()),
        "image_auroc": {k: float(image_auroc(labels, v)) for k, v in scores.items()},
    }
    # the methods take a range of image positions: the backbone reads those
    # images, the heads those images' features (views, no copies)
    images = torch.cat(batches)
    methods = {
        "backbone + join": lambda r: network.embedding(images[r.start:r.stop]),
        "head float32": lambda r: network.patch_scores(features[r.start:r.stop]),
        "head bfloat16 search": lambda r: bf16_patch_scores(network,
                                                            features[r.start:r.stop]),
    }
    speed = throughput(methods, range(len(images)), args.rounds)
    timings = {bs: {k: 1.0 / speed[k][bs] for k in methods} for bs in (1, 16)}
    result = {"command": "python benchmarks/bench_head_precision.py "
                         f"--max-train {args.max_train} --rounds {args.rounds}",
              "machine": _common.machine(), "data": name, "n_train": len(train),
              "n_prototypes": int(network.prototypes.shape[0]), "agreement": agreement,
              "seconds_per_image": timings}
    _common.write_json(args.out / "head_precision.json", result)
    rows = [[str(n), *(f"{t[k] * 1e3:.1f}" for k in t),
             f"{t['head float32'] / t['head bfloat16 search']:.2f}x"]
            for n, t in timings.items()]
    a = agreement
    lines = [
        "# Prototype head: bfloat16 search, float32 rescoring", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {result['machine']}. Defaults fitted on {len(train)} {name} training "
        f"images ({result['n_prototypes']} prototypes); {N_TEST} test images, 256 x 256.", "",
        f"Milliseconds per image over the {N_TEST} test images (fastest of "
        f"{args.rounds} rounds, methods alternating):", "",
        *_common.markdown_table(["batch", "backbone + join", "head float32",
                                 "head bfloat16 search", "head speed-up"], rows),
        "",
        f"Exactness over {a['patches']} patches: the nearest prototype changed for "
        f"{a['distance_share_changed']:.2%} of them (largest change of a distance "
        f"{a['distance_max_abs_diff']:.4f}, median distance {a['distance_median']:.3f}); "
        f"the projection's choice for {a['score_patch_share_changed']:.2%} (largest change "
        f"{a['score_patch_max_abs_diff']:.4f}). Image scores: largest change "
        f"{a['image_score_max_abs_diff']:.5f} (their spread: std {a['image_score_std']:.4f}); "
        f"image AUROC on the {N_TEST} images: "
        + ", ".join(f"{k} {v:.4f}" for k, v in a["image_auroc"].items()) + ".",
    ]
    _common.write_markdown(args.out / "head_precision.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
