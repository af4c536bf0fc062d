"""ProtoADDetector on a GPU: fit time and scoring throughput, CPU alongside.

    python benchmarks/bench_gpu.py [--out DIR] [--n-train 200] [--n-test 64]

Generated textures (:func:`skprotoad.datasets.make_defect_dataset`, 256 px),
the default settings with the bundled ``efficientnet_lite0``. Measured in one
process: fit seconds on ``device="cuda"`` and ``"cpu"`` (same images, same
seed) and the image AUROC of each; scoring throughput (images per second,
in-memory uint8 arrays, preprocessing included) at several batch sizes on
each device, next to the bare backbone on the same device and batch (the
stage maps alone: the floor of any detector built on it). Medians of
repetitions after a warm-up; CUDA timings synchronise. Results:
``DIR/gpu.{json,md}`` (default ``benchmarks/results``).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.datasets import make_defect_dataset  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_rate(fn, n_images, device, repeats):
    fn()
    _sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        rates.append(n_images / (time.perf_counter() - start))
    return statistics.median(rates)


def _backbone_rate(det, images, batch_size, device, repeats):
    """Images/s of the fitted model's backbone alone on pre-cropped tensors."""
    backbone = det.network_.embedding.backbone
    height, width = det.network_.input_size
    x = torch.rand(len(images), 3, height, width, device=device)

    @torch.inference_mode()
    def run():
        for i in range(0, len(x), batch_size):
            backbone(x[i:i + batch_size])

    return _median_rate(run, len(x), device, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cpu-fit", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA device")
    data = make_defect_dataset(n_train=args.n_train, n_test=args.n_test, image_size=256,
                               random_state=0)
    rows = []
    devices = ["cuda"] + ([] if args.skip_cpu_fit else ["cpu"])
    fitted = {}
    for device in devices:
        det = ProtoADDetector(device=device, random_state=0)
        start = time.perf_counter()
        det.fit(data.X_train)
        _sync(device)
        fit_seconds = time.perf_counter() - start
        scores = det.score_samples(data.X_test)
        fitted[device] = det
        rows.append({"what": "fit", "device": device, "n_train": args.n_train,
                     "fit_seconds": round(fit_seconds, 2),
                     "n_prototypes": int(det.prototypes_.shape[0]),
                     "image_auroc": round(float(image_auroc(data.y_test, -scores)), 4)})
        print(rows[-1], flush=True)
    if "cpu" in fitted:
        a = fitted["cuda"].set_params(device="cuda").score_samples(data.X_test)
        b = fitted["cuda"].set_params(device="cpu").score_samples(data.X_test)
        rows.append({"what": "cuda-fitted model scored on cpu vs cuda",
                     "max_abs_score_difference": float(np.max(np.abs(a - b)))})
        print(rows[-1], flush=True)
    for device in ("cuda", "cpu"):
        det = fitted["cuda"].set_params(device=device)
        for batch_size in args.batch_sizes:
            if device == "cpu" and batch_size > 16:
                continue
            det.set_params(batch_size=batch_size)
            n = min(len(data.X_test), max(batch_size * 2, 16 if device == "cpu" else 64))
            images = data.X_test[:n]
            rate = _median_rate(lambda: det.score_samples(images), n, device, args.repeats)
            maps_rate = _median_rate(lambda: det.anomaly_maps(images), n, device,
                                     args.repeats)
            bare = _backbone_rate(det, images, batch_size, device, args.repeats)
            rows.append({"what": "score", "device": device, "batch_size": batch_size,
                         "score_samples_img_s": round(rate, 1),
                         "anomaly_maps_img_s": round(maps_rate, 1),
                         "bare_backbone_img_s": round(bare, 1)})
            print(rows[-1], flush=True)
    machine = {**_common.machine_info(), "gpu": torch.cuda.get_device_name(0)}
    _common.write_json(args.out / "gpu.json", {"machine": machine, "rows": rows}, indent=1)
    lines = ["# ProtoADDetector on a GPU", "",
             f"Command: `python benchmarks/bench_gpu.py --n-train {args.n_train}`", "",
             f"Machine: {machine['gpu']}, {machine['cpus']} CPU cores, "
             f"torch {machine['torch']}. Generated 256 px textures, defaults.", "",
             "| what | device | batch | fit s | img/s score_samples | img/s anomaly_maps "
             "| img/s bare backbone | image AUROC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] in ("fit", "score"):
            lines.append(
                f"| {r['what']} | {r['device']} | {r.get('batch_size', '')} | "
                f"{r.get('fit_seconds', '')} | {r.get('score_samples_img_s', '')} | "
                f"{r.get('anomaly_maps_img_s', '')} | {r.get('bare_backbone_img_s', '')} | "
                f"{r.get('image_auroc', '')} |")
    _common.write_markdown(args.out / "gpu.md", lines)


if __name__ == "__main__":
    main()
