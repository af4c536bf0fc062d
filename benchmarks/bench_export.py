"""The exported whole-pipeline model next to the estimator: parity and speed.

    python benchmarks/bench_export.py [--data DIR] [--max-train 200] [--no-speed]

Fits the defaults (seed 0) on a seeded subset of a set's training images
(default ``../shared/data/magnetic_tile``), exports the whole inference path
(:func:`skprotoad.export.to_onnx` with ``pipeline=True``), and runs every
test image through both, each image as its file is read (RGB uint8 for the
exported model; the path for the estimator): the largest absolute
difference of maps and of scores, and the share of images whose verdicts
(and masks) agree. With speed (quiet machine only): images per second of
onnxruntime, of OpenVINO if it is installed (float32), and of the estimator on
in-memory images of the model's ``image_size`` at batch 1 and 16, medians of
repetitions.
Results: ``benchmarks/results/export.{json,md}``.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (first: this checkout's skprotoad)
import numpy as np
from PIL import Image

from skprotoad import ProtoADDetector
from skprotoad.datasets import load_mvtec
from skprotoad.export import to_onnx

DEFAULT_DATA = _common.SHARED_DATA / "magnetic_tile"


def _rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _openvino(path):
    """The file compiled by OpenVINO's CPU plugin in float32, or None without it."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU",
                              {"INFERENCE_PRECISION_HINT": "f32"})


def _median_rate(fn, n, repeats=5):
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    data = load_mvtec(args.data)
    rng = np.random.default_rng(0)
    train = list(data.train_paths)
    if args.max_train and args.max_train < len(train):
        train = [train[i] for i in np.sort(rng.permutation(len(train))[:args.max_train])]
    det = ProtoADDetector(random_state=0).fit(train)
    with tempfile.TemporaryDirectory() as tmp:
        path = to_onnx(det, Path(tmp) / "pipeline.onnx", pipeline=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        test = list(data.test_paths)
        maps, neg_scores = det.anomaly_maps(test, return_scores=True)
        flagged = det.predict(test) == -1
        above = det.predict_masks(test, threshold=det.pixel_threshold_)
        map_diff = score_diff = 0.0
        verdicts_agree = masks_agree = 0
        for i, p in enumerate(test):
            got_map, got_score, got_flag, got_mask = session.run(None, {"images": _rgb(p)[None]})
            map_diff = max(map_diff, float(np.abs(got_map[0] - maps[i]).max()))
            score_diff = max(score_diff, abs(float(got_score[0]) + float(neg_scores[i])))
            verdicts_agree += int(bool(got_flag[0]) == bool(flagged[i]))
            masks_agree += int(np.array_equal(got_mask[0], above[i] & flagged[i]))
        row = {"data": str(args.data), "n_train": len(train), "n_test": len(test),
               "max_abs_map_difference": map_diff, "max_abs_score_difference": score_diff,
               "verdicts_agree": verdicts_agree, "masks_agree": masks_agree,
               "n_flagged": int(flagged.sum())}
        if not args.no_speed:
            size = det.image_size if isinstance(det.image_size, tuple) else (det.image_size,) * 2
            images = np.stack([np.asarray(Image.fromarray(_rgb(p)).resize(size[::-1]))
                               for p in test[:16]])
            compiled = _openvino(path)
            if compiled is not None:
                # its Resize does not antialias when shrinking: images at
                # image_size only (docs/persistence.md)
                ov_scores = np.concatenate([compiled(images[j:j + 1])[compiled.outputs[1]]
                                            for j in range(len(images))])
                row["openvino_max_abs_score_difference_at_image_size"] = float(
                    np.abs(ov_scores + det.score_samples(images)).max())
                # the files as they are: the graph shrinks or enlarges them
                raw = [_rgb(p)[None] for p in test[:16]]
                row["openvino_max_abs_map_difference_raw_files"] = max(
                    float(np.abs(compiled(x)[compiled.outputs[0]]
                                 - session.run(None, {"images": x})[0]).max()) for x in raw)
            for batch in (1, 16):
                chunks = [images[j:j + batch] for j in range(0, 16, batch)]
                row[f"onnxruntime_img_s_batch{batch}"] = round(_median_rate(
                    lambda: [session.run(None, {"images": c}) for c in chunks], 16), 1)
                det.set_params(batch_size=batch)
                row[f"estimator_img_s_batch{batch}"] = round(_median_rate(
                    lambda: det.score_samples(images), 16), 1)
                if compiled is not None:
                    row[f"openvino_img_s_batch{batch}"] = round(_median_rate(
                        lambda: [compiled(c) for c in chunks], 16), 1)
    print(json.dumps(row), flush=True)
    machine = f"{_common.machine()}, onnxruntime {ort.__version__}"
    _common.write_json(args.out / "export.json", {"machine": machine, "row": row})
    lines = ["# The exported whole-pipeline model next to the estimator", "",
             f"Command: `python benchmarks/bench_export.py --max-train {args.max_train}"
             f"{' --no-speed' if args.no_speed else ''}`", "", f"Machine: {machine}.", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in row.items()]
    _common.write_markdown(args.out / "export.md", lines)


if __name__ == "__main__":
    main()
