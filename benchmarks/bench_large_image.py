"""Peak memory of one very large image through CLI ``predict`` and ``score_samples``.

Run from the repository root, niced, and not while other heavy jobs run::

    PYTHONPATH=. nice -n 10 python benchmarks/bench_large_image.py --width 14000 --height 12700

One PNG of ``--width`` x ``--height`` pixels (mostly flat, so that it is
small on disk, like the 545 kB 14000 x 12700 PNG of issue 17) is generated
into ``--workdir``, together with a tiny model (random resnet18, 64 px,
k-means) fitted on small images. Each measurement runs in a fresh child
process started by a fresh wrapper process, which reads the child's peak RSS
with ``resource.getrusage(RUSAGE_CHILDREN)`` (a process's children's maximum
would otherwise mix the measurements):

* ``baseline``: the interpreter with skprotoad, torch and the model loaded,
  nothing scored (what every command costs before it reads an image);
* ``score_samples``: ``detector.score_samples([png])`` in Python;
* ``predict``: ``python -m skprotoad predict MODEL PNG -o OUT --max-pixels N``
  (N the image's pixel count: the image is accepted), which also writes the
  overlay and the mask;
* ``predict (default limit)``: the same without ``--max-pixels``: an image
  above the default limit is skipped with a message, and the command exits 1.

Writes ``benchmarks/results/large_image.json`` and ``large_image.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

RESULTS = _common.RESULTS
REPO = _common.REPO

_SCORE = """
import sys, joblib
detector = joblib.load(sys.argv[1])
print(float(detector.score_samples([sys.argv[2]])[0]))
"""
_BASELINE = """
import sys, joblib
import skprotoad.cli
detector = joblib.load(sys.argv[1])
"""


def _measure(command):
    """Run ``command`` in a child of this (fresh) process; print its peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "returncode": done.returncode,
        "seconds": seconds,
        "peak_rss_mb": _common.peak_rss_mb(children=True),
        "stdout_tail": done.stdout[-300:],
        "stderr_tail": done.stderr[-600:],
    }))


def _run_measured(command, env):
    wrapper = [sys.executable, __file__, "--measure", "--", *command]
    done = subprocess.run(wrapper, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _make_png(path, width, height):
    """A mostly flat grey image with a few darker bands and a bright spot."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for k in range(0, width, max(1, width // 16)):
        draw.rectangle([k, 0, k + max(1, width // 64), height], fill=(110, 112, 115))
    r = max(4, min(width, height) // 50)
    draw.ellipse([width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r],
                 fill=(230, 230, 230))
    img.save(path, optimize=False)


def _make_model(workdir):
    import joblib
    import numpy as np

    from skprotoad import ProtoADDetector

    path = workdir / "tiny.joblib"
    if not path.exists():
        rng = np.random.default_rng(0)
        X = rng.integers(100, 140, size=(8, 64, 64, 3), dtype=np.uint8)
        detector = ProtoADDetector(
            backbone="resnet18", weights=None, layers=(1, 2), image_size=64, crop_size=64,
            clustering="kmeans", n_clusters=8, random_state=0,
        ).fit(X)
        joblib.dump(detector, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=14000)
    parser.add_argument("--height", type=int, default=12700)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "skprotoad_large"))
    parser.add_argument("--skip", nargs="*", default=[], help="measurements to leave out")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    png = workdir / f"large_{args.width}x{args.height}.png"
    if not png.exists():
        print(f"writing {png} ...", file=sys.stderr)
        _make_png(png, args.width, args.height)
    model = _make_model(workdir)
    pixels = args.width * args.height
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = workdir / "predict_out"
    predict = [sys.executable, "-m", "skprotoad", "predict", str(model), str(png), "-o", str(out),
               "--force", "-q"]
    runs = {
        "baseline": [sys.executable, "-c", _BASELINE, str(model)],
        "score_samples": [sys.executable, "-c", _SCORE, str(model), str(png)],
        "predict": [*predict, "--max-pixels", str(pixels)],
        "predict (default limit)": predict,
    }
    results = {}
    for name, command in runs.items():
        if name in args.skip:
            continue
        print(f"{name} ...", file=sys.stderr)
        results[name] = _run_measured(command, env)
        print(f"  {results[name]['peak_rss_mb']:.0f} MB, {results[name]['seconds']:.1f} s, "
              f"exit {results[name]['returncode']}", file=sys.stderr)

    overlay = out / "overlays" / f"{png.stem}.png"
    overlay_size = None
    if overlay.exists():
        from PIL import Image

        with Image.open(overlay) as img:
            overlay_size = img.size
    report = {
        "image": {"width": args.width, "height": args.height, "pixels": pixels,
                  "png_bytes": png.stat().st_size},
        "overlay_size": overlay_size,
        "results": results,
        "machine": _common.machine_info(),
    }
    _common.write_json(RESULTS / "large_image.json", report)
    lines = [
        "# One very large image: peak memory",
        "",
        f"`PYTHONPATH=. python benchmarks/bench_large_image.py --width {args.width} "
        f"--height {args.height}`; {report['machine']['platform']}, "
        f"{report['machine']['cpus']} CPUs (shared). One {args.width} x {args.height} PNG "
        f"({pixels / 1e6:.1f} megapixels, {png.stat().st_size / 1e3:.0f} kB), a tiny model "
        f"(random resnet18, 64 px input). Peak RSS of each command's process "
        f"(`getrusage(RUSAGE_CHILDREN)` in a fresh wrapper).",
        "",
        "| run | exit | peak RSS (MB) | time (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['returncode']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} |")
    if overlay_size:
        lines += ["", f"The overlay and mask were written at {overlay_size[0]} x {overlay_size[1]}."]
    _common.write_markdown(RESULTS / "large_image.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        _measure(sys.argv[3:])
    else:
        main()
