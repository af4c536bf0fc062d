"""File sizes and load times of saved and exported detectors, per backbone.

Run from the repository root (needs the ``export`` extra for the ONNX column)::

    PYTHONPATH=. python benchmarks/bench_persistence.py

Writes ``benchmarks/results/persistence.json`` and ``persistence.md``. Each
detector is fitted on 4 random 256 px images (crop 224, layers (1, 2, 3),
k-means with 64 prototypes) with ``weights=None``: sizes and load times do not
depend on the weights' values. Sizes grow with the number of prototypes by
``4 * n_channels`` bytes each (FINCH on real data often picks hundreds to a few
thousand). Load times are the median of ``--repeats`` loads, cold caches not
forced; "load" ends when the object is ready to score (an onnxruntime session
created, a TorchScript module loaded).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common  # first: this checkout's skprotoad

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from skprotoad import ProtoADDetector, __version__, export, persistence  # noqa: E402

BACKBONES = ("resnet18", "efficientnet_lite0", "wide_resnet50_2")
RESULTS = _common.RESULTS


def _fit(backbone):
    X = np.random.default_rng(0).integers(0, 255, (4, 256, 256, 3), dtype=np.uint8)
    return ProtoADDetector(
        backbone=backbone,
        weights=None,
        clustering="kmeans",
        n_clusters=64,
        contamination=0.1,
        batch_size=4,
        device="cpu",
        random_state=0,
    ).fit(X)


def _full_backbone_mb(backbone):
    import timm

    return 4 * sum(p.numel() for p in timm.create_model(backbone).parameters()) / 1e6


def _median_seconds(load, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _onnx_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def bench(backbone, folder, repeats):
    model = _fit(backbone)
    row = {
        "backbone": backbone,
        "n_prototypes": int(model.network_.prototype_conv.out_channels),
        "full_backbone_mb": _full_backbone_mb(backbone),
    }
    writers = {
        "joblib": (lambda p: joblib.dump(model, p), joblib.load),
        "safetensors": (lambda p: persistence.save(model, p), persistence.load),
        "torchscript": (lambda p: export.to_torchscript(model, p), _jit_load),
    }
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401, E401

        writers["onnx"] = (lambda p: export.to_onnx(model, p), _onnx_session)
    except ImportError:
        print("onnx / onnxscript / onnxruntime missing: no ONNX column", file=sys.stderr)
    for name, (write, load) in writers.items():
        path = folder / f"{backbone}.{name}"
        start = time.perf_counter()
        write(path)
        row[f"{name}_write_s"] = time.perf_counter() - start
        row[f"{name}_mb"] = os.path.getsize(path) / 1e6
        row[f"{name}_load_s"] = _median_seconds(lambda: load(path), repeats)
        print(f"{backbone:20s} {name:12s} {row[f'{name}_mb']:8.1f} MB "
              f"load {row[f'{name}_load_s']:.3f} s", file=sys.stderr)
    return row


def _markdown(rows, meta):
    formats = [f for f in ("joblib", "safetensors", "torchscript", "onnx") if f"{f}_mb" in rows[0]]
    lines = [
        "# Saved and exported model sizes and load times",
        "",
        f"`PYTHONPATH=. python benchmarks/bench_persistence.py`; {meta['machine']}, "
        f"torch {meta['torch']}, skprotoad {meta['skprotoad']}. Crop 224, layers (1, 2, 3), "
        f"{rows[0]['n_prototypes']} prototypes; load time = median of {meta['repeats']}.",
        "",
        "Size (MB):",
        "",
        "| backbone | full timm model | " + " | ".join(formats) + " |",
        "|---|---:|" + "---:|" * len(formats),
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['full_backbone_mb']:.1f} | "
            + " | ".join(f"{r[f + '_mb']:.1f}" for f in formats) + " |"
        )
    lines += ["", "Load time (s):", "", "| backbone | " + " | ".join(formats) + " |",
              "|---|" + "---:|" * len(formats)]
    for r in rows:
        lines.append(f"| {r['backbone']} | " + " | ".join(f"{r[f + '_load_s']:.3f}" for f in formats) + " |")
    lines += ["", "Write / export time (s, includes the export's numerical check):", "",
              "| backbone | " + " | ".join(formats) + " |", "|---|" + "---:|" * len(formats)]
    for r in rows:
        lines.append(f"| {r['backbone']} | " + " | ".join(f"{r[f + '_write_s']:.2f}" for f in formats) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(b, Path(tmp), args.repeats) for b in args.backbones]
    meta = {
        "machine": _common.machine(torch=False),
        "torch": torch.__version__,
        "skprotoad": __version__,
        "repeats": args.repeats,
    }
    _common.write_json(RESULTS / "persistence.json", {"meta": meta, "rows": rows})
    _common.write_markdown(RESULTS / "persistence.md", _markdown(rows, meta))
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
