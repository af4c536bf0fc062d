"""An inspection station: an exported skprotoad model run with onnxruntime alone.

No torch, no skprotoad: numpy, Pillow and onnxruntime. The model file comes
from ``skprotoad export MODEL -o station.onnx`` (or
``skprotoad.export.to_onnx(detector, "station.onnx", pipeline=True)``); it
resizes, crops, scores and thresholds inside.

    python examples/station_onnxruntime.py station.onnx IMAGE [IMAGE ...] [--masks DIR]

Prints one line per image: path, anomaly score, verdict; with ``--masks``
writes each image's defect mask (on the model's input: resized and
centre-cropped) as a PNG.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_rgb(path):
    """uint8 (H, W, 3): grey images repeated to three channels, as skprotoad reads them."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--masks", default=None, help="folder for the mask PNGs")
    args = parser.parse_args(argv)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    settings = json.loads(session.get_modelmeta().custom_metadata_map["skprotoad"])
    print(f"threshold {settings['threshold']:.6g}, input {settings['input']['shape']}")
    results = []
    for path in args.images:
        # one image per run: the images of a batch must share a size
        maps, scores, anomalous, masks = session.run(None, {"images": load_rgb(path)[None]})
        verdict = "anomaly" if anomalous[0] else "normal"
        print(f"{path}\t{scores[0]:.6f}\t{verdict}")
        results.append((path, float(scores[0]), bool(anomalous[0])))
        if args.masks:
            out = Path(args.masks) / f"{Path(path).stem}_mask.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(masks[0].astype(np.uint8) * 255).save(out)
    return results


if __name__ == "__main__":
    main()
