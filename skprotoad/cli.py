"""The ``skprotoad`` command line: ``fit``, ``predict``, ``evaluate`` and ``demo``.

Run ``skprotoad --help`` or ``python -m skprotoad --help``; ``docs/cli.md``
describes every command and its outputs. :func:`main` takes an argument list
and returns the exit code, so the commands can also be run from Python:

>>> from skprotoad.cli import main
>>> main(["demo", "-o", "demo_output"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import _images
from ._files import write_new_file
from ._version import __version__
from .backbones import WeightsUnavailableError
from ._choices import ALIGNMENTS, CLUSTERING_METHODS, IMAGE_SCORES, NORMALIZATIONS

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130

_PROG = "skprotoad"
# Files and folders `predict` and `demo` write into their output folder. The
# manifest lists the files a run writes (before it writes them); a later run
# replaces only those, never anything else the folder holds.
_OUTPUT_FILES = ("scores.csv", "skipped.csv", "run.json", "results.json", "grid.png")
_OUTPUT_DIRS = ("overlays", "masks")
_MANIFEST = ".skprotoad-outputs.json"
# Images of more pixels are skipped (predict) or left out (fit) unless
# --max-pixels says otherwise: decoding one costs about 20 bytes a pixel.
_DEFAULT_MAX_PIXELS = 50_000_000
# Overlays and masks of larger images are written scaled down to at most this
# many pixels (2048 x 2048): at the image's own size, drawing a 178-megapixel
# image's overlay took 17 GB (drawing costs about 60 bytes an output pixel).
_MAX_OUTPUT_PIXELS = 2048 * 2048
# The model formats the CLI reads and writes, for messages.
_MODEL_FORMATS = (
    "a joblib file written by 'skprotoad fit', or a .safetensors file written by "
    "'skprotoad fit -o NAME.safetensors' or skprotoad.persistence.save"
)
# Colour range of the overlays, as multiples of the image threshold: the
# threshold sits mid-scale, well below it is dark, 1.5 times it saturates.
_VMIN_FACTOR, _VMAX_FACTOR = 0.5, 1.5


class CommandError(Exception):
    """A failure reported as one line on stderr, with an exit code."""

    def __init__(self, message, code=EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# ====================================================================== parser

_EPILOG_MAIN = """\
examples:
  skprotoad demo                                  # synthetic data, no download
  skprotoad fit images/good -o model.joblib
  skprotoad predict model.joblib images/new -o results
  skprotoad evaluate data/mvtec --category bottle -o bottle.json

exit codes:
  0  success
  1  runtime failure (unreadable model or images, no images found, weights
     unavailable, invalid data)
  2  usage error (bad options, missing input path, output exists without --force
     or cannot be written)
  130  interrupted (Ctrl-C)

Run 'skprotoad COMMAND --help' for the options of a command.
"""

_EPILOG_FIT = """\
Fits on the image files directly in each TRAIN folder (sub-folders are not
searched; other files are reported and skipped). All images should be normal.
MODEL is written with joblib, or in the safe format (loading runs no code from
the file) when its name ends in .safetensors.

examples:
  skprotoad fit data/magnetic_tile/train/good -o tile.joblib
  skprotoad fit data/magnetic_tile/train/good -o tile.safetensors
  skprotoad fit good/ -o model.joblib --clustering kmeans --n-clusters 500
  skprotoad fit good/ -o model.joblib --backbone wide_resnet50_2 --device cuda
  skprotoad fit tiles/good -o tile.joblib --image-size 0.75   # keep aspect, no crop

exit codes: 0 success, 1 runtime failure, 2 usage error (MODEL exists: --force).
"""

_EPILOG_PREDICT = """\
Writes into OUT_DIR:
  scores.csv         path, score, label, width, height, overlay, mask
  overlays/NAME.png  heatmap over the image (its own size, scaled down to 2048 x 2048
                     pixels at most), predicted region outlined
  masks/NAME.png     predicted defect mask, 0 / 255, the overlay's size
  run.json           model, threshold and colour range used
  skipped.csv        files that were not images or could not be read (if any)
score = anomaly score (higher = more anomalous); label = "anomaly" when the
score is above the threshold. NAME is the file's stem, prefixed with its
folder's name when two inputs share a stem. --force replaces only the files an
earlier predict or demo wrote (listed in OUT_DIR/.skprotoad-outputs.json).
Interrupted (Ctrl-C) or failing midway, predict still writes scores.csv of the
images done, with "complete": false in run.json.

examples:
  skprotoad predict tile.joblib new_images/ -o results
  skprotoad predict tile.safetensors new_images/ -o results
  skprotoad predict tile.joblib a.png b.png -o results --threshold 0.4 --force

exit codes: 0 success, 1 runtime failure, 2 usage error (OUT_DIR not empty: --force),
130 interrupted.
"""

_EPILOG_EVALUATE = """\
Fits on train/good (BTAD: train/ok), scores the test split and reports image
AUROC, pixel AUROC, AUPRO (FPR up to 0.3), image and pixel F1-max, the fit time
and the test throughput. DATASET_ROOT is a dataset root with --category, or a
category folder itself. Pixel metrics compare maps and masks on the centre
crop; with a scale factor as --image-size, on each whole image at its own size.

examples:
  skprotoad evaluate data/magnetic_tile --clustering kmeans --n-clusters 200
  skprotoad evaluate data/magnetic_tile --image-size 0.75   # keep aspect, no crop
  skprotoad evaluate data/mvtec --category bottle -o bottle.json
  skprotoad evaluate data/BTAD --format btad --category 01

exit codes: 0 success, 1 runtime failure, 2 usage error (JSON exists: --force).
"""

_EPILOG_DEMO = """\
Generates a synthetic surface-defect data set (no data, no download), fits a
detector with the offline efficientnet_lite0 backbone, prints the metrics and
writes heatmap overlays (ground truth outlined in green), a grid.png and
results.json into OUT_DIR. Takes about a minute on two CPU cores. Run again,
it replaces its own earlier output in OUT_DIR; a folder holding other files
needs --force (and those files are kept).

examples:
  skprotoad demo
  skprotoad demo -o /tmp/demo --force -q

exit codes: 0 success, 1 runtime failure, 2 usage error (OUT_DIR holds other
files: --force).
"""


def _weights_arg(value):
    return None if value.lower() == "none" else value


def _contamination_arg(value):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None


def _crop_arg(value):
    if value.lower() == "none":
        return None
    return _positive_int(value)


# --crop-size left out: 224, or no crop with a scale-factor --image-size (which
# allows no crop). Not a string, so argparse does not convert it.
_CROP_UNSET = object()
_DEFAULT_CROP = 224


def _image_size_arg(value):
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        pass
    try:
        factor = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in pixels (an integer) or a scale factor (a number "
            f"such as 0.75), got {value!r}"
        ) from None
    if not 0.0 < factor <= _images.MAX_SCALE:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"a scale factor must be in (0, {_images.MAX_SCALE:g}], got {value!r}"
        )
    return factor


def _finite_float(value):
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        # a NaN threshold labelled every image normal
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _int_at_least(value, minimum, expected):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def _positive_int(value):
    return _int_at_least(value, 1, "a positive integer")


def _non_negative_int(value):
    return _int_at_least(value, 0, "an integer >= 0")


def _add_common(parser):
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or progress messages"
    )


def _add_max_pixels(parser):
    parser.add_argument(
        "--max-pixels", type=_positive_int, default=_DEFAULT_MAX_PIXELS, metavar="N",
        help=f"skip images of more than N pixels (default: {_DEFAULT_MAX_PIXELS:,}; "
        f"decoding one takes about 20 bytes a pixel); Pillow refuses more than "
        f"178,956,970 in any case",
    )


def _add_detector_options(parser):
    group = parser.add_argument_group("detector options")
    group.add_argument(
        "--backbone", default="efficientnet_lite0",
        help="timm CNN: efficientnet_lite0 (default, works offline), "
        "wide_resnet50_2 (the paper's), resnet18, ...",
    )
    group.add_argument(
        "--layers", type=int, nargs="+", default=[1, 2, 3], metavar="I",
        help="backbone stages whose features are joined (default: 1 2 3)",
    )
    group.add_argument(
        "--weights", type=_weights_arg, default="imagenet",
        help="'imagenet' (default), a state-dict file, or 'none' (random; tests only)",
    )
    group.add_argument(
        "--clustering", choices=CLUSTERING_METHODS, default="finch",
        help="how prototypes are learned (default: finch)",
    )
    group.add_argument(
        "--n-clusters", type=_positive_int, default=None, metavar="N",
        help="number of prototypes (required with kmeans; finch picks one if omitted)",
    )
    group.add_argument(
        "--n-farthest", type=_non_negative_int, default=None, metavar="N",
        help="prototypes added after clustering, each the training patch farthest "
        "from all prototypes so far (default: the estimator's)",
    )
    group.add_argument(
        "--image-size", type=_image_size_arg, default=256, metavar="PX|FACTOR",
        help="images are resized to PX x PX ... (default: 256); or, with a "
        "number such as 0.75, each image is resized by that factor keeping its "
        "aspect ratio and scored whole (for images of one camera and resolution "
        "but of varying size or aspect)",
    )
    group.add_argument(
        "--crop-size", type=_crop_arg, default=_CROP_UNSET, metavar="PX",
        help="... and centre-cropped to PX x PX, or 'none' (default: 224; none "
        "with a scale factor)",
    )
    group.add_argument(
        "--sigma", type=_finite_float, default=4.0,
        help="Gaussian smoothing of the anomaly maps, in pixels (default: 4)",
    )
    group.add_argument(
        "--alignment", choices=ALIGNMENTS, default="center",
        help="features at receptive-field centres (default) or the reference "
        "code's join",
    )
    group.add_argument(
        "--neighborhood-size", type=_positive_int, default=3, metavar="K",
        help="average each stage's features over K x K patches (odd; 1 = off, "
        "as in the paper; default: 3)",
    )
    group.add_argument(
        "--normalization", choices=NORMALIZATIONS, default="image",
        help="features divided by the image's mean norm and Euclidean distance "
        "(default), or unit-norm patch features and 1 - cosine (the paper)",
    )
    group.add_argument(
        "--image-score", choices=IMAGE_SCORES, default="projection",
        help="with --normalization image: image scores from the same prototypes' "
        "|x| (1 - max cosine) (default) or 1 - max cosine, or the map's maximum",
    )
    group.add_argument(
        "--contamination", type=_contamination_arg, default="auto",
        help="'auto' (threshold from held-out normal images; default) or the "
        "share of training images taken as anomalous",
    )
    _add_runtime_options(group)
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_runtime_options(group, defaults_from_model=False):
    group.add_argument(
        "--batch-size", type=_positive_int, default=None if defaults_from_model else 16,
        metavar="N",
        help="images per forward pass"
        + (" (default: the model's)" if defaults_from_model else " (default: 16)"),
    )
    group.add_argument(
        "--device", default=None if defaults_from_model else "auto",
        help="auto, cpu, cuda or cuda:N"
        + (" (default: the model's)" if defaults_from_model else " (default: auto)"),
    )


def build_parser():
    """The argument parser of the ``skprotoad`` command.

    Returns
    -------
    parser : argparse.ArgumentParser
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Image anomaly detection and localization with ProtoAD "
        "(prototypes of pre-trained CNN patch features).",
        epilog=_EPILOG_MAIN,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    fit = commands.add_parser(
        "fit", help="learn a model from a folder of normal images",
        description="Learn a ProtoAD model from normal images and save it with joblib.",
        epilog=_EPILOG_FIT, formatter_class=formatter,
    )
    fit.add_argument("train", nargs="+", metavar="TRAIN", help="folder(s) or files of normal images")
    fit.add_argument("-o", "--output", required=True, metavar="MODEL",
                     help="model file to write: NAME.joblib, or NAME.safetensors (safe format)")
    fit.add_argument("--force", action="store_true", help="overwrite MODEL if it exists")
    _add_common(fit)
    _add_max_pixels(fit)
    _add_detector_options(fit)
    fit.set_defaults(handler=_cmd_fit)

    predict = commands.add_parser(
        "predict", help="score images, write scores.csv, heatmap overlays and masks",
        description="Score images with a fitted model; write a CSV, heatmap overlays and masks.",
        epilog=_EPILOG_PREDICT, formatter_class=formatter,
    )
    predict.add_argument("model", metavar="MODEL",
                         help="model file written by 'skprotoad fit' (.joblib or .safetensors)")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    predict.add_argument(
        "--force", action="store_true",
        help="write into OUT_DIR even if it is not empty, replacing only the outputs of "
        "an earlier predict or demo",
    )
    predict.add_argument(
        "--threshold", type=_finite_float, default=None, metavar="T",
        help="anomaly score (and map value) above which an image (pixel) is an "
        "anomaly (default: the model's)",
    )
    predict.add_argument(
        "--vmin", type=_finite_float, default=None,
        help="map value shown darkest (default: 0.5 x threshold)",
    )
    predict.add_argument(
        "--vmax", type=_finite_float, default=None,
        help="map value shown brightest (default: 1.5 x threshold)",
    )
    predict.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default: 0.5)")
    _add_common(predict)
    _add_max_pixels(predict)
    _add_runtime_options(predict.add_argument_group("runtime options"), defaults_from_model=True)
    predict.set_defaults(handler=_cmd_predict)

    evaluate = commands.add_parser(
        "evaluate", help="fit and score a data set in MVTec AD or BTAD layout",
        description="Fit on a data set's train split, score its test split, report metrics.",
        epilog=_EPILOG_EVALUATE, formatter_class=formatter,
    )
    evaluate.add_argument("root", metavar="DATASET_ROOT", help="data set root or category folder")
    evaluate.add_argument("--category", default=None, help="category folder under DATASET_ROOT")
    evaluate.add_argument(
        "--format", choices=("mvtec", "btad"), default="mvtec",
        help="folder layout (default: mvtec)",
    )
    evaluate.add_argument("-o", "--output", default=None, metavar="JSON", help="write the results as JSON")
    evaluate.add_argument("--save-model", default=None, metavar="MODEL",
                          help="also save the fitted model (.joblib, or .safetensors)")
    evaluate.add_argument("--force", action="store_true", help="overwrite JSON / MODEL if they exist")
    _add_common(evaluate)
    _add_detector_options(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on synthetic defects (no data needed)",
        description="Fit and evaluate on generated surface-defect images; write overlays.",
        epilog=_EPILOG_DEMO, formatter_class=formatter,
    )
    demo.add_argument("-o", "--output", default="demo_output", metavar="OUT_DIR",
                      help="output folder (default: demo_output)")
    demo.add_argument(
        "--force", action="store_true",
        help="write into OUT_DIR even if it holds files the demo did not write (they are kept)",
    )
    demo.add_argument(
        "--clustering", choices=CLUSTERING_METHODS, default="finch",
        help="how prototypes are learned (default: finch)",
    )
    demo.add_argument("--n-clusters", type=_positive_int, default=None, metavar="N",
                      help="number of prototypes (required with kmeans)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_common(demo)
    # Smaller problems for tests and quick checks; not part of the documented interface.
    demo.add_argument("--n-train", type=_positive_int, default=40, help=argparse.SUPPRESS)
    demo.add_argument("--n-test", type=_positive_int, default=30, help=argparse.SUPPRESS)
    demo.add_argument("--size", type=_positive_int, default=128, help=argparse.SUPPRESS)
    demo.add_argument("--backbone", default="efficientnet_lite0", help=argparse.SUPPRESS)
    demo.add_argument("--weights", type=_weights_arg, default="imagenet", help=argparse.SUPPRESS)
    demo.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    demo.set_defaults(handler=_cmd_demo)
    return parser


# ======================================================================== main


def main(argv=None):
    """Run the ``skprotoad`` command line.

    Parameters
    ----------
    argv : list of str, default=None
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    code : int
        0 on success, 1 on a runtime failure, 2 on a usage error (argparse's
        own errors included), 130 when interrupted.

    Examples
    --------
    >>> from skprotoad.cli import main
    >>> main(["fit", "good/", "-o", "model.joblib", "-q"])  # doctest: +SKIP
    0
    """
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also while parsing or importing, before a command ran
        print(f"\n{_PROG}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


def _run(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        args.handler(args)
    except CommandError as exc:
        if args.debug:
            raise
        _error(str(exc))
        return exc.code
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as exc:
        # OSError covers FileNotFoundError and WeightsUnavailableError;
        # RuntimeError covers torch's (e.g. out of memory).
        if args.debug:
            raise
        _error(_describe(exc))
        return EXIT_FAILURE
    except Exception as exc:  # a bug, or a library error of an unexpected type
        if args.debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the "
               f"traceback, and please report it)")
        return EXIT_FAILURE
    return EXIT_OK


def _describe(exc):
    message = str(exc) or type(exc).__name__
    if isinstance(exc, WeightsUnavailableError):
        return message
    if isinstance(exc, (MemoryError, RuntimeError)) and not isinstance(exc, NotImplementedError):
        return f"{type(exc).__name__}: {message}"
    return message


def _error(message):
    print(f"{_PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _warn(message):
    print(f"{_PROG}: warning: {message}", file=sys.stderr)


def _info(args, message):
    if not args.quiet:
        print(message, file=sys.stderr)


def _progress(args, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=args.quiet, leave=False)


# ============================================================ inputs, outputs


def _is_image_name(path):
    return path.suffix.lower() in _images.IMAGE_EXTENSIONS and not path.name.startswith(".")


def collect_images(inputs, max_pixels=None):
    """Expand files and folders into readable image files.

    Folders give their image files (sorted by name, not recursively); files
    that are not images (by extension), whose header cannot be read, or
    that have more than ``max_pixels`` pixels are returned as skipped, with
    the reason.

    Parameters
    ----------
    inputs : sequence of str or path-like
    max_pixels : int, default=None
        Largest image accepted, in pixels; None: Pillow's own limit only.

    Returns
    -------
    paths : list of str
        Readable image files, in the order given; duplicates removed.
    skipped : list of (str, str)
        (path, reason) of files left out.

    Raises
    ------
    CommandError
        If an input does not exist (exit code 2).
    """
    candidates, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = sorted(path.iterdir(), key=lambda p: p.name)
            files = [p for p in entries if p.is_file()]
            candidates += [p for p in files if _is_image_name(p)]
            skipped += [
                (str(p), "not an image file (extension)")
                for p in files
                if not _is_image_name(p) and not p.name.startswith(".")
            ]
            subdirs = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
            if subdirs and not any(_is_image_name(p) for p in files):
                skipped.append(
                    (str(path), f"holds no images; its sub-folders are not searched: "
                     f"{', '.join(subdirs[:5])}{' ...' if len(subdirs) > 5 else ''}")
                )
        elif path.is_file():
            if _is_image_name(path):
                candidates.append(path)
            else:
                skipped.append((str(path), "not an image file (extension)"))
        else:
            raise CommandError(f"no such file or folder: {item}", EXIT_USAGE)

    paths, seen = [], set()
    for path in candidates:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        reason = _unreadable_reason(path, max_pixels)
        if reason is None:
            paths.append(str(path))
        else:
            skipped.append((str(path), reason))
    return paths, skipped


def _unreadable_reason(path, max_pixels=None):
    """Why ``path`` cannot be used, from its header only (no pixel decoding), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in _images.HIGH_BIT_DEPTH_MODES:
                return (f"a {img.mode} (16-bit or float) image; convert it to 8-bit "
                        f"(or pass it to the Python API as a float array in [0, 1])")
            if max_pixels is not None and img.width * img.height > max_pixels:
                return (f"{img.width} x {img.height} = {img.width * img.height:,} pixels, "
                        f"more than --max-pixels {max_pixels:,} (it would take about "
                        f"{20 * img.width * img.height / 1e9:.1f} GB to score); raise "
                        f"--max-pixels to accept it")
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely: {exc}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"cannot read image: {exc}"
    return None


def _report_skipped(skipped, limit=10):
    if not skipped:
        return
    _warn(f"skipped {len(skipped)} file(s):")
    for path, reason in skipped[:limit]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more", file=sys.stderr)


def _require_images(paths, inputs):
    if not paths:
        where = ", ".join(str(i) for i in inputs)
        raise CommandError(
            f"no readable image files ({', '.join(_images.IMAGE_EXTENSIONS)}) in {where}."
        )


def output_names(paths):
    """Distinct output file names (without extension) for input paths.

    The file's stem when it is unique; otherwise the parent folder's name and
    the stem (``good_001``), then the extension, then a counter. Names are
    compared case-insensitively, for case-insensitive file systems.

    Examples
    --------
    >>> output_names(["a/x.png", "b/x.png", "b/y.png"])
    ['a_x', 'b_x', 'y']
    """
    stems = [Path(p).stem for p in paths]
    counts = Counter(s.casefold() for s in stems)
    names, used = [], set()
    for path, stem in zip(map(Path, paths), stems):
        candidates = [stem] if counts[stem.casefold()] == 1 else []
        with_parent = f"{path.parent.name}_{stem}" if path.parent.name else stem
        candidates += [with_parent, f"{with_parent}_{path.suffix.lstrip('.').lower()}"]
        name = next((c for c in candidates if c.casefold() not in used), None)
        counter = 2
        while name is None:
            candidate = f"{candidates[-1]}-{counter}"
            name = candidate if candidate.casefold() not in used else None
            counter += 1
        used.add(name.casefold())
        names.append(name)
    return names


def _check_file_free(path, force, what):
    """Refuse an existing ``path`` without ``force``, and one that cannot be
    written: checked before any work, so that a fit is not lost at the end."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder; give a file name.", EXIT_USAGE)
    if path.exists() and not force:
        raise CommandError(f"{what} {path} exists; pass --force to overwrite it.", EXIT_USAGE)
    _check_writable(path.parent, f"{what} {path}")


def _check_writable(folder, what):
    """Raise a CommandError naming ``what`` unless files can be created in
    ``folder``, or in its nearest existing parent where it does not exist yet."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"cannot write {what}: {existing} is not a folder.", EXIT_USAGE)
    try:
        # Trying is the only reliable test (os.access is wrong for root, for
        # read-only file systems and for ACLs).
        fd, probe = tempfile.mkstemp(prefix=".skprotoad-probe-", dir=existing)
    except OSError as exc:
        raise CommandError(
            f"cannot write {what}: {exc.strerror or exc} ({existing}).", EXIT_USAGE
        ) from None
    os.close(fd)
    os.unlink(probe)


def _prepare_out_dir(path, force, planned, inputs=(), replace_own=False):
    """Make ``path`` ready for a run that writes the files ``planned``.

    A folder that is not empty is refused without ``force``, except, with
    ``replace_own``, one that holds only the output of an earlier run. Files
    an earlier run wrote (listed in its manifest) are removed: stale overlays
    would mislead. Anything else is never removed or replaced: a planned
    output that would replace another file, or an input, is refused even with
    ``force``. The new manifest is written before any output, so that even an
    interrupted run's files are known as ours.

    Parameters
    ----------
    path : path-like
    force : bool
    planned : list of str
        Files the run may write, relative to ``path`` (``overlays/x.png``).
    inputs : list of str
        The run's input files, which must not be among the files replaced.
    replace_own : bool
        Replace an earlier run's output without ``force`` (the demo's folder).

    Returns
    -------
    path : pathlib.Path
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"output folder {path} is a file.", EXIT_USAGE)
    previous = [p for p in _read_manifest(path) if (path / p).is_file() or (path / p).is_symlink()]
    if path.is_dir() and any(path.iterdir()) and not force:
        foreign = _foreign_files(path, previous)
        if not (replace_own and not foreign):
            listed = "" if not foreign else f" ({_some(foreign)})"
            raise CommandError(
                f"output folder {path} is not empty{listed}; pass --force to write into it "
                f"(only the files of an earlier skprotoad run there are replaced).",
                EXIT_USAGE,
            )
    own = set(previous)
    clashes = [p for p in planned if p not in own and (os.path.lexists(path / p))]
    if clashes:
        raise CommandError(
            f"output folder {path} holds files that skprotoad did not write and this run "
            f"would replace: {_some(clashes)}. Move them, or choose another folder.",
            EXIT_USAGE,
        )
    replaced = {os.path.realpath(path / p) for p in set(planned) | own}
    used = [p for p in inputs if os.path.realpath(p) in replaced]
    if used:
        raise CommandError(
            f"input files would be replaced by this run's outputs: {_some(used)}; "
            f"choose another output folder.",
            EXIT_USAGE,
        )
    _check_writable(path, f"into output folder {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # listed before anything is removed or written: an interrupted run's
        # files stay known as ours
        _write_manifest(path, sorted(own | set(planned)))
        for name in previous:
            (path / name).unlink(missing_ok=True)
        _write_manifest(path, sorted(planned))
    except OSError as exc:
        raise CommandError(f"cannot write into output folder {path}: {exc}", EXIT_USAGE) from None
    return path


def _some(names, limit=5):
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_output_name(name):
    """Whether ``name`` (from a manifest) is a path this tool writes: nothing
    else is ever removed, whatever a damaged or edited manifest says."""
    parts = name.split("/")
    if len(parts) == 1:
        return name in _OUTPUT_FILES
    return (
        len(parts) == 2
        and parts[0] in _OUTPUT_DIRS
        and parts[1].endswith(".png")
        and parts[1] not in (".png", "..png")
        and "\\" not in parts[1]
    )


def _read_manifest(path):
    try:
        with open(Path(path) / _MANIFEST) as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, list):
        return []
    return [name for name in files if isinstance(name, str) and _is_output_name(name)]


def _write_manifest(path, files):
    _write_json(Path(path) / _MANIFEST, {
        "written_by": f"{_PROG} {__version__}",
        "note": "files a later 'skprotoad predict --force' or 'skprotoad demo' may replace",
        "files": files,
    })


def _foreign_files(path, own):
    """Files in ``path`` that are not in ``own`` (relative names), at the top
    level and in the output sub-folders."""
    own = set(own) | {_MANIFEST}
    foreign = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.name in _OUTPUT_DIRS and entry.is_dir() and not entry.is_symlink():
            foreign += [
                f"{entry.name}/{p.name}" for p in sorted(entry.iterdir(), key=lambda p: p.name)
                if f"{entry.name}/{p.name}" not in own
            ]
        elif entry.name not in own:
            foreign.append(entry.name)
    return foreign


def _write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")

    write_new_file(path, write, overwrite=True)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    return str(value)


def _is_safe_format_name(path):
    return Path(path).suffix.lower() == ".safetensors"


def _save_model(detector, path):
    """Save with joblib, or in the safe format when ``path`` ends in .safetensors."""
    if _is_safe_format_name(path):
        from .persistence import save

        save(detector, path, overwrite=True)
        return
    import joblib

    write_new_file(path, lambda tmp: joblib.dump(detector, tmp), overwrite=True)


def _looks_like_safetensors(path):
    """A safetensors file: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(10)
    size = int.from_bytes(head[:8], "little") if len(head) == 10 else -1
    return head[8:] == b'{"' and 0 < size <= os.path.getsize(path) - 8


def _load_model(path):
    from sklearn.utils.validation import check_is_fitted

    from .detector import ProtoADDetector

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"no such model file: {path}", EXIT_USAGE)
    # by name, or by content: a file named .safetensors is never unpickled
    if _is_safe_format_name(path) or _looks_like_safetensors(path):
        from .persistence import load

        try:
            return load(path)
        except ValueError as exc:  # names the file and the check that failed
            raise CommandError(f"cannot load model: {exc}") from exc
    import joblib

    try:
        detector = joblib.load(path)
    except ValueError as exc:  # ours: a damaged model, another format version
        raise CommandError(f"cannot load model {path}: {exc}") from exc
    except Exception as exc:  # any unpickling failure means the same to the user
        # where the file is cut decides which of the two the unpickler raises
        ends_early = isinstance(exc, EOFError) or "exhausted" in str(exc)
        detail = "the file ends early (truncated?)" if ends_early else _describe(exc)
        raise CommandError(
            f"cannot load model {path}: it is not a skprotoad model ({detail}). Models are "
            f"{_MODEL_FORMATS}."
        ) from exc
    if not isinstance(detector, ProtoADDetector):
        raise CommandError(
            f"{path} holds a {type(detector).__name__}, not a ProtoADDetector "
            f"(write models with 'skprotoad fit')."
        )
    try:
        check_is_fitted(detector, "network_")
    except Exception as exc:
        raise CommandError(f"the model in {path} is not fitted.") from exc
    return detector


# ================================================== shared scoring plumbing


def _pixel_threshold(detector, threshold=None):
    """Map value above which a pixel is a defect: the user's image
    ``threshold`` where it applies to pixels too (the image score is the
    map's maximum), otherwise the detector's own ``pixel_threshold_``."""
    if threshold is None or not detector.network_.score_is_map_max:
        return detector.pixel_threshold_
    return float(threshold)


def color_range(detector, threshold=None, vmin=None, vmax=None):
    """The fixed (vmin, vmax) of the overlays, anchored at the pixel threshold.

    Defaults put the threshold in the middle of the colour scale: maps at half
    the threshold or less are dark, maps at 1.5 times or more saturate. The
    same range for every image makes the colours comparable across images.
    ``threshold`` (the user's) counts only where it applies to pixels too.
    """
    t = _pixel_threshold(detector, threshold)
    if t <= 0:
        # No scale to anchor at: the whole range of 1 - cosine (distances
        # with normalization="image" have no fixed range; 0..2 still shows them).
        default_min, default_max = 0.0, 2.0
    else:
        default_min, default_max = _VMIN_FACTOR * t, _VMAX_FACTOR * t
    vmin = default_min if vmin is None else float(vmin)
    vmax = default_max if vmax is None else float(vmax)
    if not vmin < vmax:
        raise CommandError(f"--vmin ({vmin:g}) must be below --vmax ({vmax:g}).", EXIT_USAGE)
    return vmin, vmax


def score_and_write(
    detector,
    items,
    *,
    names=None,
    out_dir=None,
    threshold=None,
    vmin=None,
    vmax=None,
    alpha=0.5,
    write=None,
    truth_masks=None,
    keep_maps=False,
    strict=False,
    progress=None,
    result=None,
):
    """Score images chunk by chunk and write their overlays and masks.

    The one scoring loop of ``predict``, ``evaluate`` and ``demo``. Images are
    scored in chunks of ``detector.batch_size``, so memory does not grow with
    their number; a chunk that fails to load is retried image by image and the
    unreadable images are skipped (or, with ``strict``, raise).

    Parameters
    ----------
    detector : fitted ProtoADDetector
    items : list of paths or of image arrays
    names : list of str, default=None
        Output names (no extension), one per item; needed with ``out_dir``.
    out_dir : path, default=None
        Writes ``overlays/<name>.png`` (heatmap at the image's own size, the
        outline of ``truth_masks`` if given, else of the predicted mask) and
        ``masks/<name>.png`` (predicted mask, 0 / 255, the image's own size;
        empty exactly for images labelled normal, as
        :meth:`ProtoADDetector.predict_masks`);
        both scaled down to at most 2048 x 2048 pixels for larger images, so
        that memory stays bounded. Each file is written atomically.
    threshold : float, default=None
        Anomaly score above which an image is an anomaly, and map value above
        which a pixel is; ``None`` uses the detector's, so that labels equal
        ``detector.predict``. When the detector's image score is not its map's
        maximum (``normalization="image"``, ``image_score`` not ``"map"``) it applies
        to images only, and pixels keep ``detector.pixel_threshold_``.
    vmin, vmax, alpha : float
        Overlay colour range and opacity, see :func:`skprotoad.plotting.overlay`.
    write : sequence of bool, default=None
        Which items get overlay and mask files (default: all).
    truth_masks : sequence of (H, W) bool arrays, default=None
        Ground truth, outlined in the overlays instead of the prediction.
    keep_maps : bool, default=False
        Return the crop-geometry anomaly maps (for metrics): an array, or a
        list when the model's input size varies (a scale-factor
        ``image_size``).
    strict : bool, default=False
        Raise on an unreadable image instead of skipping it.
    progress : tqdm bar, default=None
        Advanced by one per image.
    result : dict, default=None
        An empty result from :func:`_new_result`, filled as images are done
        (an image once its files are written): what was done when an
        exception interrupts the loop.

    Returns
    -------
    result : dict
        ``index`` (int array, the items scored), ``score`` (float, higher =
        more anomalous, equal to ``-detector.score_samples``), ``anomaly``
        (bool), ``size`` (list of (height, width)), ``overlay`` / ``mask``
        (relative output paths or ""), ``maps`` (crop maps, with ``keep_maps``)
        and ``skipped`` (list of (index, reason)). An image whose score is not
        finite is skipped (raises with ``strict``): it is not called normal.
    """
    from ._masks import verdict_mask
    from .plotting import overlay, save_png

    offset = detector.offset_ if threshold is None else -float(threshold)
    pixel_threshold = _pixel_threshold(detector, threshold)
    sequence = _images.ImageSequence(items, name="images")
    crop = detector.network_.input_size
    if out_dir is not None:
        out_dir = Path(out_dir)
        if vmin is None or vmax is None:
            vmin, vmax = color_range(detector, threshold, vmin, vmax)
    result = _new_result() if result is None else result
    skipped = result["skipped"]
    chunk_size = int(detector.batch_size)
    for start in range(0, len(items), chunk_size):
        chunk = list(range(start, min(start + chunk_size, len(items))))
        for index, crop_map, score in _score_chunk(detector, items, chunk, strict, skipped):
            if not math.isfinite(score):
                reason = "its anomaly score is not finite: the model or the image is broken"
                if strict:
                    raise ValueError(f"image {index}: {reason}.")
                skipped.append((index, reason))
                continue
            # The same arithmetic as ProtoADDetector.predict, so labels agree exactly.
            anomaly = bool((-score) - offset < 0)
            size = sequence.original_size(index)
            overlay_rel = mask_rel = ""
            if out_dir is not None and (write is None or write[index]):
                # bounded: 17 GB for one 178-megapixel image at its own size
                shown = _output_size(size)
                heat = _images.crop_map_to_input(crop_map, shown, detector.image_size, crop)
                # the rule of ProtoADDetector.predict_masks: agrees with `anomaly`
                predicted = verdict_mask(heat, anomaly, pixel_threshold)
                outline = predicted if truth_masks is None else _resized_mask(truth_masks[index], shown)
                image = items[index] if shown == tuple(size) else _resized_image(items[index], shown)
                picture = overlay(image, heat, alpha=alpha, vmin=vmin, vmax=vmax, mask=outline)
                overlay_rel = f"overlays/{names[index]}.png"
                mask_rel = f"masks/{names[index]}.png"
                save_png(picture, out_dir / overlay_rel)
                save_png(predicted, out_dir / mask_rel)
            # appended once its files are written: an interrupted run lists
            # only images whose outputs are complete
            for key, value in (("index", index), ("score", score), ("anomaly", anomaly),
                               ("size", size), ("overlay", overlay_rel), ("mask", mask_rel)):
                result[key].append(value)
            if keep_maps:
                result["maps"].append(crop_map)
        if progress is not None:
            progress.update(len(chunk))
    return _finish_result(result, keep_maps, crop)


def _new_result():
    return {k: [] for k in ("index", "score", "anomaly", "size", "overlay", "mask", "maps",
                            "skipped")}


def _finish_result(result, keep_maps=False, crop=None):
    """The lists of :func:`score_and_write` as arrays, in a new dict."""
    out = dict(result)
    out["index"] = np.asarray(result["index"], dtype=int)
    out["score"] = np.asarray(result["score"], dtype=np.float64)
    out["anomaly"] = np.asarray(result["anomaly"], dtype=bool)
    if keep_maps and result["maps"] and crop is not None:
        out["maps"] = np.stack(result["maps"])
    elif not keep_maps:
        out["maps"] = None
    return out


def _output_size(size):
    """(height, width) of the overlay and mask of an image of ``size``."""
    height, width = size
    if height * width <= _MAX_OUTPUT_PIXELS:
        return tuple(size)
    factor = math.sqrt(_MAX_OUTPUT_PIXELS / (height * width))
    return max(1, int(height * factor)), max(1, int(width * factor))


def _resized_image(item, size):
    """Image ``item`` (path or array) as uint8 RGB of ``size``, without a
    full-size float copy."""
    from PIL import Image

    from .plotting import _as_rgb_uint8

    height, width = size
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            img.draft("RGB", (width, height))  # JPEG: decode at a fraction of the size
            if img.mode == "La":  # the only mode Pillow converts to nothing (opaque here)
                img = img.getchannel("L")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            small = img.resize((width, height), Image.BILINEAR, reducing_gap=2.0)
    else:
        small = Image.fromarray(_as_rgb_uint8(item)).resize((width, height), Image.BILINEAR)
    return np.asarray(small.convert("RGB"))


def _resized_mask(mask, size):
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(size):
        return mask
    from PIL import Image

    small = Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)
    return np.asarray(small) > 127


def _score_chunk(detector, items, chunk, strict, skipped):
    """Yield (index, crop map, anomaly score) for the images of ``chunk`` that
    can be read."""
    try:
        maps, scores = detector.anomaly_maps([items[i] for i in chunk], return_scores=True)
        yield from zip(chunk, maps, (-scores).tolist())
        return
    except (ValueError, OSError) as exc:
        if strict:
            raise
        if len(chunk) == 1:
            skipped.append((chunk[0], _describe(exc)))
            return
    # One image of the chunk is unreadable (a truncated file, say): find it.
    for index in chunk:
        yield from _score_chunk(detector, items, [index], strict, skipped)


def compute_metrics(labels, scores, masks=None, maps=None):
    """Image- and pixel-level metrics of a scored test set.

    Parameters
    ----------
    labels : array of int, 1 = anomalous
    scores : array of float, higher = more anomalous
    masks, maps : arrays of shape (n, h, w) or lists of 2-D arrays, default=None
        Ground truth and anomaly maps in the same geometry (the crop, or each
        image's own size).

    Returns
    -------
    metrics : dict
        ``image_auroc``, ``image_f1_max`` and, with masks, ``pixel_auroc``,
        ``aupro`` (FPR up to 0.3) and ``pixel_f1_max``.
    """
    from .metrics import evaluate_maps

    return evaluate_maps(labels, scores, masks, maps, fpr_limit=0.3)


_METRIC_LABELS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO@0.3"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
)


def format_table(metrics, extra=()):
    """Metrics (and extra (label, text) rows) as an aligned two-column table."""
    rows = [(label, f"{metrics[key]:.4f}") for key, label in _METRIC_LABELS if key in metrics]
    rows += list(extra)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>10}" for label, value in rows)


# Detector parameter <- command-line option, for the options a command has.
_DETECTOR_OPTIONS = {
    "backbone": "backbone",
    "layers": "layers",
    "weights": "weights",
    "clustering": "clustering",
    "n_clusters": "n_clusters",
    "n_farthest": "n_farthest",
    "sigma": "sigma",
    "alignment": "alignment",
    "neighborhood_size": "neighborhood_size",
    "normalization": "normalization",
    "image_score": "image_score",
    "image_size": "image_size",
    "crop_size": "crop_size",
    "contamination": "contamination",
    "batch_size": "batch_size",
    "device": "device",
    "random_state": "seed",
}


def _make_detector(args, **overrides):
    from .detector import ProtoADDetector

    params = {
        param: getattr(args, option)
        for param, option in _DETECTOR_OPTIONS.items()
        if hasattr(args, option)
    }
    if "layers" in params:
        params["layers"] = tuple(params["layers"])
    if params.get("n_farthest") is None:
        params.pop("n_farthest", None)  # the estimator's default
    params.update(overrides)
    if params.get("crop_size") is _CROP_UNSET:
        scale = _images.is_scale(params.get("image_size"))
        params["crop_size"] = None if scale else _DEFAULT_CROP
    return ProtoADDetector(verbose=not args.quiet, **params)


def _fit(args, detector, train):
    _info(args, f"fitting on {len(train)} images with {detector.backbone} "
                f"({detector.clustering} prototypes) ...")
    start = time.perf_counter()
    # stdout is for results (tables, summaries); library chatter goes with the bars.
    with contextlib.redirect_stdout(sys.stderr):
        detector.fit(train)
    seconds = time.perf_counter() - start
    _info(args, f"fitted in {seconds:.1f} s: {detector.prototypes_.shape[0]} prototypes, "
                f"anomaly-score threshold {-detector.offset_:.4g}")
    # A saved model should not show progress bars when used from Python.
    detector.set_params(verbose=False)
    return seconds


# ==================================================================== commands


def _cmd_fit(args):
    _check_file_free(args.output, args.force, "model file")
    paths, skipped = collect_images(args.train, max_pixels=args.max_pixels)
    _report_skipped(skipped)
    _require_images(paths, args.train)
    detector = _make_detector(args)
    _fit(args, detector, paths)
    _save_model(detector, args.output)
    print(f"saved model to {args.output} (fitted on {len(paths)} images)")


def _cmd_predict(args):
    detector = _load_model(args.model)
    out_dir = Path(args.output)
    paths, skipped = collect_images(args.inputs, max_pixels=args.max_pixels)
    _report_skipped(skipped)
    _require_images(paths, args.inputs)
    overrides = {k: getattr(args, k) for k in ("batch_size", "device") if getattr(args, k) is not None}
    detector.set_params(verbose=False, **overrides)
    try:
        # checked here: in the scoring loop it would read as a problem of each file
        detector._torch_device()
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    vmin, vmax = color_range(detector, args.threshold, args.vmin, args.vmax)
    if not 0.0 <= args.alpha <= 1.0:
        raise CommandError(f"--alpha must be in [0, 1], got {args.alpha}.", EXIT_USAGE)
    names = output_names(paths)
    planned = ["scores.csv", "skipped.csv", "run.json"]
    planned += [f"{folder}/{name}.png" for name in names for folder in _OUTPUT_DIRS]
    _prepare_out_dir(out_dir, args.force, planned, inputs=paths)

    done = _new_result()
    try:
        with _progress(args, len(paths), "predict") as bar:
            result = score_and_write(
                detector, paths, names=names, out_dir=out_dir, threshold=args.threshold,
                vmin=vmin, vmax=vmax, alpha=args.alpha, progress=bar, result=done,
            )
    except (KeyboardInterrupt, Exception):
        # Ctrl-C, a full disk, a bug: the images done are listed all the same,
        # and run.json says the run is incomplete. Best effort: on a full disk
        # this may fail too, and the original error is what the user sees.
        with contextlib.suppress(Exception):
            _write_predict_results(args, detector, out_dir, paths, skipped,
                                   _finish_result(done), vmin, vmax, complete=False)
        raise
    _report_skipped([(paths[i], r) for i, r in result["skipped"]])
    skipped = _write_predict_results(args, detector, out_dir, paths, skipped, result, vmin,
                                     vmax, complete=True)
    threshold = -detector.offset_ if args.threshold is None else args.threshold
    print(f"{len(result['index'])} images scored, {int(result['anomaly'].sum())} anomalies "
          f"(threshold {threshold:.4g}), {len(skipped)} skipped; wrote {out_dir}/scores.csv, "
          f"overlays/ and masks/")
    if not len(result["index"]):
        raise CommandError("no image could be scored.")


def _write_predict_results(args, detector, out_dir, paths, skipped, result, vmin, vmax,
                           complete):
    """Write scores.csv, skipped.csv and run.json; return all skipped files."""
    skipped = skipped + [(paths[i], reason) for i, reason in result["skipped"]]
    _write_scores_csv(out_dir / "scores.csv", [paths[i] for i in result["index"]], result)
    if skipped:
        _write_skipped_csv(out_dir / "skipped.csv", skipped)
    _write_json(out_dir / "run.json", {
        "model": str(Path(args.model).resolve()),
        # false: interrupted or failed; scores.csv lists the images done
        "complete": complete,
        "threshold": -detector.offset_ if args.threshold is None else args.threshold,
        "pixel_threshold": _pixel_threshold(detector, args.threshold),
        "vmin": vmin,
        "vmax": vmax,
        "n_images": len(result["index"]),
        "n_anomalies": int(result["anomaly"].sum()),
        "n_skipped": len(skipped),
        "skprotoad_version": __version__,
    })
    return skipped


def _write_text(path, text):
    """Write ``path`` atomically: a reader never sees it half written."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    write_new_file(path, write, overwrite=True)


def _write_scores_csv(path, paths, result, extra=None):
    extra = extra or {}
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "label", "width", "height", "overlay", "mask", *extra])
        for row, p in enumerate(paths):
            height, width = result["size"][row]
            writer.writerow([
                p,
                f"{result['score'][row]:.8g}",
                "anomaly" if result["anomaly"][row] else "normal",
                width,
                height,
                result["overlay"][row],
                result["mask"][row],
                *(values[row] for values in extra.values()),
            ])
        _write_text(path, f.getvalue())


def _write_skipped_csv(path, skipped):
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
        _write_text(path, f.getvalue())


def _load_dataset(args):
    from .datasets import load_btad, load_mvtec

    if not Path(args.root).is_dir():
        raise CommandError(f"no such data set folder: {args.root}", EXIT_USAGE)
    loader = load_btad if args.format == "btad" else load_mvtec
    return loader(args.root, args.category)


def _per_type_auroc(types, labels, scores, normal_name):
    """Image AUROC of each defect type against the normal test images."""
    from .metrics import image_auroc

    types = np.asarray(types)
    normal = types == normal_name
    out = {}
    for name in sorted(set(types[~normal].tolist())):
        keep = normal | (types == name)
        if normal.any():
            out[name] = image_auroc(labels[keep], scores[keep])
    return out


def _cmd_evaluate(args):
    from .datasets import load_input_masks, load_masks

    for path, what in ((args.output, "results file"), (args.save_model, "model file")):
        if path is not None:
            _check_file_free(path, args.force, what)
    data = _load_dataset(args)
    detector = _make_detector(args)
    fit_seconds = _fit(args, detector, data.train_paths)
    if args.save_model:
        _save_model(detector, args.save_model)
        _info(args, f"saved model to {args.save_model}")

    _info(args, f"scoring {len(data.test_paths)} test images ...")
    start = time.perf_counter()
    with _progress(args, len(data.test_paths), "scoring") as bar:
        result = score_and_write(detector, data.test_paths, keep_maps=True, strict=True, progress=bar)
    score_seconds = time.perf_counter() - start
    if detector.network_.input_size is None:
        # Scale geometry: the map covers the whole image; compare each map with
        # its mask at the image's own size (no common grid to resample to).
        geometry = "input"
        maps = [
            _images.crop_map_to_input(m, size, detector.image_size, None)
            for m, size in zip(result["maps"], result["size"])
        ]
        masks = load_input_masks(data.test_mask_paths, result["size"])
    else:
        geometry = "crop"
        maps = result["maps"]
        masks = load_masks(data.test_mask_paths, detector.image_size, detector.crop_size)
    result["maps"] = None
    metrics = compute_metrics(data.test_labels, result["score"], masks, maps)
    del maps, masks
    normal_name = "ok" if args.format == "btad" else "good"
    per_type = _per_type_auroc(
        data.test_defect_types, data.test_labels, result["score"], normal_name
    )
    speed = len(data.test_paths) / score_seconds
    timing = [("fit time (s)", f"{fit_seconds:.1f}"), ("test images/s", f"{speed:.2f}")]
    name = args.category or Path(args.root).name
    print(f"{name}: {len(data.train_paths)} training images, {len(data.test_paths)} test "
          f"images ({int(data.test_labels.sum())} anomalous)")
    print(format_table(metrics, timing))
    if len(per_type) > 1:
        print("image AUROC per defect type: "
              + ", ".join(f"{k} {v:.3f}" for k, v in per_type.items()))
    if args.output:
        _write_json(args.output, {
            "dataset": {
                "root": str(args.root),
                "category": args.category,
                "format": args.format,
                "n_train": len(data.train_paths),
                "n_test": len(data.test_paths),
                "n_test_anomalous": int(data.test_labels.sum()),
            },
            "detector": detector.get_params(),
            "metrics": metrics,
            # "crop": maps and masks on the model input; "input": at each
            # image's own size (scale-factor image_size)
            "pixel_metrics_geometry": geometry,
            "image_auroc_per_defect_type": per_type,
            "fit_seconds": fit_seconds,
            "test_images_per_second": speed,
            "threshold": -detector.offset_,
            "pixel_threshold": detector.pixel_threshold_,
            "skprotoad_version": __version__,
        })
        _info(args, f"wrote {args.output}")


# Overlays the demo writes: this many anomalous and normal test images.
_DEMO_SHOWN = (6, 2)


def _demo_selection(labels):
    anomalous = np.flatnonzero(labels == 1)[: _DEMO_SHOWN[0]]
    normal = np.flatnonzero(labels == 0)[: _DEMO_SHOWN[1]]
    return np.concatenate([anomalous, normal])


def _cmd_demo(args):
    from .datasets import make_defect_dataset
    from .plotting import grid, save_png

    # (generating the images takes a second; the fit is the work)
    data = make_defect_dataset(
        n_train=args.n_train, n_test=args.n_test, image_size=args.size, random_state=args.seed
    )
    names = [f"test_{i:03d}_{'defect' if y else 'normal'}" for i, y in enumerate(data.y_test)]
    shown = _demo_selection(data.y_test)
    planned = ["scores.csv", "results.json", "grid.png"]
    planned += [f"{folder}/{names[i]}.png" for i in shown for folder in _OUTPUT_DIRS]
    # The demo's own folder: its earlier output is replaced without --force.
    out_dir = _prepare_out_dir(args.output, args.force, planned, replace_own=True)
    _info(args, f"generated {args.n_train} normal training images and {args.n_test} test "
                f"images ({int(data.y_test.sum())} with defects) of {args.size} x {args.size} px")
    detector = _make_detector(args, image_size=args.size, crop_size=args.size)
    fit_seconds = _fit(args, detector, data.X_train)

    write = np.zeros(len(data.y_test), dtype=bool)
    write[shown] = True
    start = time.perf_counter()
    with _progress(args, len(data.X_test), "scoring") as bar:
        result = score_and_write(
            detector, list(data.X_test), names=names, out_dir=out_dir, write=write,
            truth_masks=data.masks_test, keep_maps=True, strict=True, progress=bar,
        )
    score_seconds = time.perf_counter() - start
    metrics = compute_metrics(data.y_test, result["score"], data.masks_test, result["maps"])

    truth = ["anomaly" if y else "normal" for y in data.y_test]
    _write_scores_csv(out_dir / "scores.csv", names, result, extra={"truth": truth})
    titles = [
        f"{'defect' if data.y_test[i] else 'normal'}, score {result['score'][i]:.3f} "
        f"({'anomaly' if result['anomaly'][i] else 'normal'})"
        for i in shown
    ]
    figure = grid(
        [out_dir / result["overlay"][i] for i in shown], titles=titles, ncols=4,
        tile_size=max(args.size, 192),
    )
    save_png(figure, out_dir / "grid.png")
    speed = len(data.X_test) / score_seconds
    _write_json(out_dir / "results.json", {
        "data": {"n_train": args.n_train, "n_test": args.n_test, "size": args.size,
                 "n_test_anomalous": int(data.y_test.sum()), "seed": args.seed},
        "detector": detector.get_params(),
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "test_images_per_second": speed,
        "threshold": -detector.offset_,
        "pixel_threshold": detector.pixel_threshold_,
        "skprotoad_version": __version__,
    })
    print(f"synthetic defects, {args.n_train} training / {args.n_test} test images "
          f"({int(data.y_test.sum())} with defects)")
    print(format_table(metrics, [("fit time (s)", f"{fit_seconds:.1f}"),
                                 ("test images/s", f"{speed:.2f}")]))
    print(f"wrote {len(shown)} overlays (ground truth outlined in green), grid.png, "
          f"scores.csv and results.json to {out_dir}")
