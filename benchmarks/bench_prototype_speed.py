"""Inference speed vs number of prototypes (efficientnet_lite0, 224 x 224 crop, CPU).

The prototype head is a 1 x 1 convolution: its cost grows linearly with the
number of prototypes K, while the backbone's is fixed. This script times the
whole network (backbone + head + upsampling + smoothing) on one batch of 16
random images for each K, interleaving the K values over several rounds and
keeping each one's fastest round, so that the ratios are measured side by
side on a noisy machine.

    python benchmarks/bench_prototype_speed.py [--out DIR]

Writes DIR/prototype_speed.{json,md} (default benchmarks/results).
"""
import argparse
import os
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.network import PatchEmbedding, ProtoADNetwork  # noqa: E402

KS = [250, 500, 1000, 2000, 4000]
ROUNDS = 5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    embedding = PatchEmbedding(create_feature_extractor("efficientnet_lite0", (1, 2, 3)),
                               neighborhood_size=3).eval()
    nets = {k: ProtoADNetwork(embedding, torch.randn(k, embedding.n_channels), (224, 224)).eval()
            for k in KS}
    x = torch.rand(16, 3, 224, 224)
    with torch.inference_mode():
        backbone_only = []
        best = {k: float("inf") for k in KS}
        for _ in range(ROUNDS):
            t = time.perf_counter()
            embedding(x)
            backbone_only.append(time.perf_counter() - t)
            for k in KS:
                t = time.perf_counter()
                nets[k](x)
                best[k] = min(best[k], time.perf_counter() - t)
        def gflop(module):
            with FlopCounterMode(display=False) as counter:
                module(x[:1])
            return counter.get_total_flops() / 1e9

        flops = {k: gflop(nets[k]) for k in KS}
        embedding_flops = gflop(embedding)
    base = min(backbone_only)
    rows = [{"n_prototypes": k, "gflop_per_image": round(flops[k], 2),
             "head_flop_share": round(1 - embedding_flops / flops[k], 2), "images_per_s": round(len(x) / best[k], 1),
             "relative_to_1000": round(best[1000] / best[k], 2),
             "head_share": round(1 - base / best[k], 2)} for k in KS]
    out = args.out
    _common.write_json(out / "prototype_speed.json",
                       {"embedding_images_per_s": round(len(x) / base, 1), "rows": rows,
                        "load": os.getloadavg()[0], "threads": torch.get_num_threads()})
    lines = ["# Inference speed vs number of prototypes (efficientnet_lite0, CPU)", "",
             "Command: `python benchmarks/bench_prototype_speed.py`", "",
             f"One batch of 16 images of 224 x 224, fastest of {ROUNDS} interleaved rounds, "
             f"{torch.get_num_threads()} torch threads, shared 2-core machine (1-minute load "
             f"{os.getloadavg()[0]:.1f} at the end). Backbone and feature join alone: "
             f"{len(x) / base:.1f} images/s. head_share: the part of the time spent after the "
             "feature join (1x1 prototype convolution, max, upsampling, smoothing).", "",
             f"GFLOP: counted by torch.utils.flop_counter for one image (backbone and join: "
             f"{embedding_flops:.2f}); unlike the times, they do not depend on the machine's load.", "",
             "| n_prototypes | GFLOP / image | head share of FLOPs | images/s | speed relative to 1,000 | head share of time |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['n_prototypes']} | {r['gflop_per_image']} | {r['head_flop_share']} | "
              f"{r['images_per_s']} | {r['relative_to_1000']} | {r['head_share']} |" for r in rows]
    _common.write_markdown(out / "prototype_speed.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
