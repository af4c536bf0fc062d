"""An inspection station: an exported skprotoad model run with onnxruntime alone.

No torch, no skprotoad: numpy, Pillow and onnxruntime. The model file comes
from ``skprotoad export MODEL -o station.onnx`` (or
``skprotoad.export.to_onnx(detector, "station.onnx", pipeline=True)``); it
resizes, crops, scores and thresholds inside.

    python examples/station_onnxruntime.py station.onnx IMAGE [IMAGE ...] [--masks DIR]

Prints one line per image: path, anomaly score, verdict; with ``--masks``
writes each image's defect mask (on the model's input: resized and
centre-cropped) as a PNG. Images that skprotoad refuses (16-bit or float,
transparent pixels) stop the run with an error naming the file.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

# skprotoad's rules for files (skprotoad._images.load_image), which the model
# was fitted under: a station reading pixels otherwise scores other images.
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # scale unknown
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_ORIENTATION = 0x0112  # EXIF tag


def load_rgb(path):
    """uint8 (H, W, 3) as skprotoad reads the file.

    Turned as its EXIF orientation says (as viewers show it, and as the
    model's training files were read); palettes, CMYK, opaque alpha and the
    other 8-bit modes as RGB, grey repeated to three channels. 16-bit and
    float images, and transparent pixels, raise ``ValueError``: their
    meaning is unknown, and skprotoad refuses them too.
    """
    with Image.open(path) as img:
        img.load()
        try:
            orientation = Image.Image.getexif(img).get(_ORIENTATION, 1)
        except Exception:  # a corrupt EXIF block: read as stored, as skprotoad does
            orientation = 1
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
        if img.mode in _HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"{path} is a {img.mode} (16-bit or float) image, whose scale "
                             f"is unknown; convert it to 8-bit first.")
        if img.mode not in ("L", "RGB") and _has_transparency(img):
            raise ValueError(f"{path} is a {img.mode} image with transparent pixels, whose "
                             f"colour is undefined; composite it onto a background first.")
        if img.mode == "La":  # opaque premultiplied grey is plain grey
            img = img.getchannel("L")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _has_transparency(img):
    if img.mode in _ALPHA_MODES:
        return img.getchannel(img.getbands()[-1]).getextrema()[0] < 255
    if "transparency" in img.info:  # a palette entry or colour key marked transparent
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


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
    try:
        main()
    except ValueError as exc:  # an image skprotoad would refuse
        sys.exit(f"error: {exc}")
