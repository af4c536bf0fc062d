"""Peak memory of ``fit`` and flat memory of streamed scoring.

Run from the repository root, niced so that it does not disturb timings::

    PYTHONPATH=. nice -n 10 python benchmarks/bench_memory.py

(a) **fit**: ``ProtoADDetector`` with the package defaults (efficientnet_lite0,
    image 256, crop 224, layers (1, 2, 3), 3 x 3 aggregation,
    ``contamination="auto"``) except ``clustering="kmeans", n_clusters=1000``,
    fitted on ``--n-fit`` generated 256 px PNG files passed as paths, so that
    the input itself is not held in memory. Its peak RSS (VmHWM) is compared
    with the predicted bound: the float32 feature array
    ``n_images * h * w * C * 4`` bytes, plus the process before ``fit``
    (interpreter, torch, the model). ``--finch`` also fits with the default
    FINCH, under ``--finch-timeout`` seconds.
(b) **predict**: ``score_samples`` on ``--n-predict`` PNG files (256 px)
    in one call; a background thread samples VmRSS while a counter wrapped
    around the image loader tracks how many images were read, so the RSS
    after 1k, 5k and 10k images can be read off.

Each measurement runs in a fresh subprocess, so that VmHWM is its own. The
images are generated once into ``--workdir`` (default: a folder under the
system temporary directory, kept for reruns; about 1.2 GB for 12,000 files).
Writes ``benchmarks/results/memory.json`` and ``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad
from _common import rss_bytes, vm_hwm_bytes as peak_rss_bytes

RESULTS = _common.RESULTS
COMMAND = "PYTHONPATH=. nice -n 10 python benchmarks/bench_memory.py"
IMAGE_SIZE = 256
GiB = 2**30


class Sampler(threading.Thread):
    """Samples VmRSS (and an optional progress counter) every ``interval`` s."""

    def __init__(self, interval=0.25, progress=None):
        super().__init__(daemon=True)
        self.interval = interval
        self.progress = progress or (lambda: None)
        self.samples = []  # (seconds, rss bytes, progress)
        self._done = threading.Event()
        self._t0 = time.perf_counter()

    def run(self):
        while not self._done.is_set():
            self.samples.append((time.perf_counter() - self._t0, rss_bytes(), self.progress()))
            self._done.wait(self.interval)

    def stop(self):
        self._done.set()
        self.join()
        self.samples.append((time.perf_counter() - self._t0, rss_bytes(), self.progress()))
        return self.samples


# ------------------------------------------------------------------ images
def generate(folder, n_images, anomaly_ratio, seed, chunk=100):
    """Write ``n_images`` generated 256 px PNGs into ``folder``; return the paths."""
    from PIL import Image

    from skprotoad.datasets import make_defect_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(n_images)]
    done = folder / f".complete_{n_images}"
    if done.exists():
        return paths
    for start in range(0, n_images, chunk):
        n = min(chunk, n_images - start)
        X, _, _ = make_defect_images(
            n, image_size=IMAGE_SIZE, anomaly_ratio=anomaly_ratio, random_state=seed + start
        )
        for i in range(n):
            Image.fromarray(X[i]).save(paths[start + i])
        print(f"  {folder.name}: {start + n}/{n_images}", file=sys.stderr, flush=True)
    done.touch()
    return paths


class _CountingPath(os.PathLike):
    """A path that counts how often it is opened (``os.fspath``)."""

    def __init__(self, path, counter):
        self.path, self.counter = path, counter

    def __fspath__(self):
        self.counter[0] += 1
        return self.path


# ------------------------------------------------------------------ phases
def phase_fit(args):
    import numpy as np
    import torch

    from skprotoad import ProtoADDetector

    paths = sorted(str(p) for p in (Path(args.workdir) / "train").glob("*.png"))[: args.n_fit]
    det = ProtoADDetector(
        clustering=args.clustering,
        n_clusters=args.n_clusters or None,  # 0 = FINCH's default
        random_state=0,
    )
    # What the process holds before fit: interpreter, torch, timm, the backbone.
    from skprotoad.backbones import create_feature_extractor

    backbone = create_feature_extractor(det.backbone, det.layers, det.weights)
    model_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    del backbone
    rss_before = rss_bytes()
    sampler = Sampler(interval=0.5)
    sampler.start()
    start = time.perf_counter()
    det.fit(paths)
    seconds = time.perf_counter() - start
    samples = sampler.stop()
    h, w, c = det.feature_shape_
    feature_bytes = len(paths) * h * w * c * 4
    if args.save_model:
        import joblib

        joblib.dump(det, args.save_model)
    return {
        "n_images": len(paths),
        "clustering": args.clustering,
        "n_clusters": args.n_clusters,
        "n_prototypes": int(det.prototypes_.shape[0]),
        "feature_shape": [h, w, c],
        "feature_bytes": feature_bytes,
        "model_bytes": model_bytes,
        "rss_before_fit_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "predicted_bound_bytes": rss_before + feature_bytes + model_bytes,
        "fit_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "rss_timeline": [(round(t, 1), r) for t, r, _ in samples[:: max(1, len(samples) // 400)]],
        "offset": float(det.offset_),
        "mean_calibration_score": float(np.mean(det.calibration_scores_)),
    }


def phase_predict(args):
    import joblib
    import torch

    det = joblib.load(args.model)
    paths = sorted(str(p) for p in (Path(args.workdir) / "test").glob("*.png"))[: args.n_predict]
    loaded = [0]
    # the detector opens a path once, when it reads the image: counting the
    # opens counts the images read so far
    paths = [_CountingPath(p, loaded) for p in paths]
    rss_before = rss_bytes()
    sampler = Sampler(interval=0.25, progress=lambda: loaded[0])
    sampler.start()
    start = time.perf_counter()
    scores = det.score_samples(paths)
    seconds = time.perf_counter() - start
    samples = sampler.stop()
    checkpoints = {}
    for mark in (1000, 2000, 5000, 10000, len(paths)):
        after = [s for s in samples if s[2] is not None and s[2] >= mark]
        if mark <= len(paths) and after:
            checkpoints[str(mark)] = after[0][1]
    return {
        "n_images": len(paths),
        "batch_size": det.batch_size,
        "rss_before_bytes": rss_before,
        "rss_after_n_images_bytes": checkpoints,
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": seconds,
        "images_per_second": len(paths) / seconds,
        "torch_threads": torch.get_num_threads(),
        "scores_finite": bool(__import__("numpy").isfinite(scores).all()),
        "rss_timeline": [
            (round(t, 1), r, n) for t, r, n in samples[:: max(1, len(samples) // 400)]
        ],
    }


def _run_phase(phase, args, extra=(), timeout=None):
    cmd = [sys.executable, __file__, "--phase", phase, "--workdir", str(args.workdir),
           "--n-fit", str(args.n_fit), "--n-predict", str(args.n_predict), *extra]
    print(f"running {phase}: {' '.join(extra)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout} s (timeout)"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- reporting
def _gib(value):
    return f"{value / GiB:.2f}"


def _markdown(result):
    meta = result["meta"]
    lines = [
        "# Memory of fit and of streamed scoring",
        "",
        f"`{COMMAND}`; {meta['machine']}, torch {meta['torch']}, skprotoad "
        f"{meta['skprotoad']}. Generated 256 px PNG files passed as paths; "
        f"efficientnet_lite0 defaults (crop 224, layers (1, 2, 3), 3 x 3 aggregation, "
        f"contamination='auto'); peak RSS = VmHWM of a fresh process per row.",
        "",
        "## fit",
        "",
        "| clustering | images | feature grid | feature array GiB | RSS before fit GiB "
        "| predicted bound GiB | peak RSS GiB | peak / bound | fit s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["fit"]:
        if "error" in row:
            lines.append(f"| {row['label']} | | | | | | | | {row['error']} |")
            continue
        h, w, c = row["feature_shape"]
        lines.append(
            f"| {row['label']} | {row['n_images']} | {h} x {w} x {c} | "
            f"{_gib(row['feature_bytes'])} | {_gib(row['rss_before_fit_bytes'])} | "
            f"{_gib(row['predicted_bound_bytes'])} | {_gib(row['peak_rss_bytes'])} | "
            f"{row['peak_rss_bytes'] / row['predicted_bound_bytes']:.2f} | "
            f"{row['fit_seconds']:.0f} |"
        )
    p = result["predict"]
    lines += ["", "## score_samples, streamed from paths", ""]
    if "error" in p:
        lines.append(f"Failed: {p['error']}")
    else:
        marks = p["rss_after_n_images_bytes"]
        lines += [
            "| images read | " + " | ".join(marks) + " | peak |",
            "|---|" + "---:|" * (len(marks) + 1),
            "| RSS GiB | " + " | ".join(_gib(v) for v in marks.values())
            + f" | {_gib(p['peak_rss_bytes'])} |",
            "",
            "RSS per window of 1,000 images read (samples every 0.25 s, thinned to 400 "
            "for the JSON):",
            "",
            "| images | " + " | ".join(w for w, _, _ in _windows(p)) + " |",
            "|---|" + "---:|" * len(_windows(p)),
            "| mean GiB | " + " | ".join(f"{m:.2f}" for _, m, _ in _windows(p)) + " |",
            "| max GiB | " + " | ".join(f"{x:.2f}" for _, _, x in _windows(p)) + " |",
            "",
            f"{p['n_images']} images in one `score_samples` call, batch size "
            f"{p['batch_size']}: {p['seconds']:.0f} s ({p['images_per_second']:.1f} "
            f"images/s); RSS before the call {_gib(p['rss_before_bytes'])} GiB.",
        ]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines) + "\n"


def _windows(predict, size=1000):
    """(label, mean GiB, max GiB) of the RSS samples per window of images read."""
    groups = {}
    last = (predict["n_images"] - 1) // size
    for _, rss, n in predict["rss_timeline"]:
        groups.setdefault(min(n // size, last), []).append(rss / GiB)
    return [
        (f"{k * size // 1000}-{(k + 1) * size // 1000}k", sum(v) / len(v), max(v))
        for k, v in sorted(groups.items())
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("fit", "predict"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "skprotoad_bench_memory")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--n-predict", type=int, default=10000)
    parser.add_argument("--clustering", default="kmeans")
    parser.add_argument("--n-clusters", type=int, default=1000)
    parser.add_argument("--save-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--finch", action="store_true", help="also fit with default FINCH")
    parser.add_argument("--finch-n-fit", type=int, default=500,
                        help="training images of the FINCH row (FINCH needs several "
                        "times the feature array; 2,000 images do not fit in 24 GB)")
    parser.add_argument("--finch-timeout", type=int, default=5400)
    parser.add_argument("--skip-fit", action="store_true",
                        help="reuse the k-means row and model of an earlier run")
    parser.add_argument("--skip-predict", action="store_true",
                        help="reuse the predict result of an earlier run")
    parser.add_argument("--notes", default="", help="a paragraph added to memory.md")
    parser.add_argument("--output", default="memory")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the .md from the .json (after editing its notes)")
    args = parser.parse_args(argv)

    if args.markdown_only:
        result = _common.read_json(RESULTS / f"{args.output}.json")
        _common.write_markdown(RESULTS / f"{args.output}.md", _markdown(result))
        print(_markdown(result))
        return

    if args.phase == "fit":
        print(json.dumps(phase_fit(args)))
        return
    if args.phase == "predict":
        print(json.dumps(phase_predict(args)))
        return

    import torch

    from skprotoad import __version__

    start = time.perf_counter()
    generate(args.workdir / "train", args.n_fit, anomaly_ratio=0.0, seed=0)
    generate(args.workdir / "test", args.n_predict, anomaly_ratio=0.5, seed=10**6)
    print(f"images ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model = args.workdir / "kmeans_model.joblib"
    previous = RESULTS / f"{args.output}.json"
    fit_rows = []
    if args.skip_fit and previous.is_file() and model.is_file():
        fit_rows = [r for r in json.loads(previous.read_text())["fit"] if r["label"] == "kmeans"]
    if not fit_rows:
        row = _run_phase("fit", args, ["--clustering", args.clustering, "--n-clusters",
                                       str(args.n_clusters), "--save-model", str(model)])
        fit_rows = [{"label": f"{args.clustering}, {args.n_clusters}", **row}]
        fit_rows[0]["label"] = "kmeans" if args.clustering == "kmeans" else fit_rows[0]["label"]
        print(json.dumps({k: v for k, v in row.items() if k != "rss_timeline"}), file=sys.stderr)
    if args.finch:
        finch_args = argparse.Namespace(**{**vars(args), "n_fit": args.finch_n_fit})
        row = _run_phase("fit", finch_args, ["--clustering", "finch", "--n-clusters", "0"],
                         timeout=args.finch_timeout)
        fit_rows.append({"label": "finch (default, 1,000 prototypes)", **row})
        print(json.dumps({k: v for k, v in row.items() if k != "rss_timeline"}),
              file=sys.stderr)
    if args.skip_predict and previous.is_file():
        predict = json.loads(previous.read_text())["predict"]
    else:
        predict = _run_phase("predict", args, ["--model", str(model)])
    print(json.dumps({k: v for k, v in predict.items() if k != "rss_timeline"}), file=sys.stderr)
    result = {
        "meta": {
            "command": COMMAND,
            "machine": _common.machine(torch=False),
            "torch": torch.__version__,
            "skprotoad": __version__,
            "load_average": os.getloadavg(),
        },
        "config": {"n_fit": args.n_fit, "n_predict": args.n_predict,
                   "image_size": IMAGE_SIZE},
        "fit": fit_rows,
        "predict": predict,
        "notes": args.notes,
    }
    _common.write_json(RESULTS / f"{args.output}.json", result)
    _common.write_markdown(RESULTS / f"{args.output}.md", _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
