"""The ``skprotoad`` command line: ``fit``, ``predict``, ``evaluate``, ``export``, ``demo``.

Run ``skprotoad --help`` or ``python -m skprotoad --help``; ``docs/cli.md``
describes every command and its outputs. This module holds the parser and the
commands; the scoring loop they share is :mod:`skprotoad.batch_scoring`, the
files they read and write :mod:`skprotoad.cli_files`. :func:`main` takes an argument list
and returns the exit code, so the commands can also be run from Python:

>>> from skprotoad.cli import main
>>> main(["demo", "-o", "demo_output"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
from pathlib import Path

# Only light modules here: `skprotoad --help` must not wait for torch (about
# 1.5 s). torch, numpy and the modules that import them (the detector, images,
# scoring, plotting, data sets) are imported by the commands that use them.
from ._choices import (
    ALIGNMENTS, CLUSTERING_METHODS, IMAGE_SCORES, MAP_METRICS, NORMALIZATIONS, PADDINGS,
)
from ._defaults import DETECTOR_DEFAULTS
from ._version import __version__
from .cli_files import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    OUTPUT_DIRS,
    CommandError,
    check_distinct_outputs,
    check_file_free,
    collect_images,
    describe_error,
    kept_if_created,
    load_model,
    output_names,
    prepare_out_dir,
    require_images,
    save_model,
    write_json,
    write_scores_csv,
    write_skipped_csv,
)

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

_EXIT_INTERRUPTED = 130

_PROG = "skprotoad"
# Images of more pixels are skipped (predict) or left out (fit) unless
# --max-pixels says otherwise: decoding one costs about 20 bytes a pixel.
_DEFAULT_MAX_PIXELS = 50_000_000


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

_EPILOG_EXPORT = """\
The exported file needs no skprotoad and no torch (ONNX: onnxruntime alone).
Its input 'images' is a uint8 batch (N, H, W, 3) of RGB images of any size
(one size per batch; repeat grey images to 3 channels); resizing, cropping,
the network and both thresholds are inside. Outputs: 'maps' (N, crop_h,
crop_w), 'scores' (N,) = -score_samples, 'anomalous' (N,) = predict == -1,
'masks' (N, crop_h, crop_w). The settings travel in the file's metadata
('skprotoad'). Models fitted with a scale-factor --image-size cannot be
exported (their input size varies per image).

  skprotoad export model.safetensors -o station.onnx
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
  masks/NAME.png     predicted defect mask, 0 / 255, the image's own size (scaled
                     down to 2048 x 2048 pixels at most)
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
writes heatmap overlays (prediction outlined in cyan, ground truth in green), a grid.png and
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


# --crop-size left out: the estimator's crop_size, or no crop with a
# scale-factor --image-size (which allows no crop). Not a string, so argparse
# does not convert it.
_CROP_UNSET = object()
# The command line's one default that differs from the estimator's
# (random_state=None): two runs with the same options give the same model.
_DEFAULT_SEED = 0


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
    # imported only for a factor: _images imports torch, which --help should not wait for
    from . import _images

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
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="also show the clustering's own progress detail",
    )


def _add_max_pixels(parser):
    parser.add_argument(
        "--max-pixels", type=_positive_int, default=_DEFAULT_MAX_PIXELS, metavar="N",
        help=f"skip images of more than N pixels (default: {_DEFAULT_MAX_PIXELS:,}; "
        f"decoding one takes about 20 bytes a pixel); Pillow refuses more than "
        f"178,956,970 in any case",
    )


def _add_detector_options(parser):
    # Defaults are the estimator's (skprotoad/_defaults.py), in the command
    # line's form: lists for tuples, _CROP_UNSET for crop_size.
    default = DETECTOR_DEFAULTS
    group = parser.add_argument_group("detector options")
    group.add_argument(
        "--backbone", default=default["backbone"],
        help="timm CNN: efficientnet_lite0 (works offline), wide_resnet50_2 (the "
        "paper's), resnet18, ... (default: %(default)s)",
    )
    group.add_argument(
        "--layers", type=int, nargs="+", default=list(default["layers"]), metavar="I",
        help="backbone stages whose features are joined (default: "
        f"{' '.join(str(i) for i in default['layers'])})",
    )
    group.add_argument(
        "--weights", type=_weights_arg, default=default["weights"],
        help="'imagenet', a state-dict file, or 'none' (random; tests only) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--clustering", choices=CLUSTERING_METHODS, default=default["clustering"],
        help="how prototypes are learned (default: %(default)s)",
    )
    group.add_argument(
        "--n-clusters", type=_positive_int, default=default["n_clusters"], metavar="N",
        help="number of prototypes (required with kmeans; finch picks one if omitted)",
    )
    group.add_argument(
        "--n-farthest", type=_non_negative_int, default=default["n_farthest"], metavar="N",
        help="prototypes added after clustering, each the training patch farthest "
        "from all prototypes so far (default: the estimator's)",
    )
    group.add_argument(
        "--max-patches", type=_positive_int, default=default["max_patches"], metavar="N",
        help="most patch features held while fitting; above it each image gives an "
        "equal share of its patches (mostly a seeded random draw), so memory stays bounded "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--image-size", type=_image_size_arg, default=default["image_size"],
        metavar="PX|FACTOR",
        help="images are resized to PX x PX ... (default: %(default)s); or, with a "
        "number such as 0.75, each image is resized by that factor keeping its "
        "aspect ratio and scored whole (for images of one camera and resolution "
        "but of varying size or aspect)",
    )
    group.add_argument(
        "--crop-size", type=_crop_arg, default=_CROP_UNSET, metavar="PX",
        help=f"... and centre-cropped to PX x PX, or 'none' (default: "
        f"{default['crop_size']}; none with a scale factor)",
    )
    group.add_argument(
        "--padding", choices=PADDINGS, default=default["padding"],
        help="what the backbone sees past the image border: its zero padding, or the "
        "image mirrored (reflect) so that border patches look like the interior "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--sigma", type=_finite_float, default=default["sigma"],
        help=f"Gaussian smoothing of the anomaly maps, in pixels (default: "
        f"{default['sigma']:g})",
    )
    group.add_argument(
        "--alignment", choices=ALIGNMENTS, default=default["alignment"],
        help="center: features at receptive-field centres; paper: the reference "
        "code's join (default: %(default)s)",
    )
    group.add_argument(
        "--neighborhood-size", type=_positive_int, default=default["neighborhood_size"],
        metavar="K",
        help="average each stage's features over K x K patches (odd; 1 = off, "
        "as in the paper; default: %(default)s)",
    )
    group.add_argument(
        "--normalization", choices=NORMALIZATIONS, default=default["normalization"],
        help="image: features divided by the image's mean norm and Euclidean "
        "distance; patch: unit-norm patch features and 1 - cosine (the paper) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--image-score", choices=IMAGE_SCORES, default=default["image_score"],
        help="with --normalization image: image scores from the same prototypes' "
        "|x| (1 - max cosine) (projection), 1 - max cosine (cosine), or the map's "
        "maximum (map) (default: %(default)s)",
    )
    group.add_argument(
        "--map-metric", choices=MAP_METRICS, default=default["map_metric"],
        help="with --normalization image: the anomaly map's distance with the finest "
        "stage's channels whitened by the normal patches' covariance (whitened), or the "
        "plain distance (euclidean); the image score reads the metric --score-whitening "
        "sets (default: %(default)s)",
    )
    group.add_argument(
        "--score-whitening", type=float, default=default["score_whitening"], metavar="S",
        help="with the whitened map and an image score other than map: how far the image "
        "score's metric moves from the plain one (0) to the map's whitened one (1) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--position-baseline", action=argparse.BooleanOptionalAction,
        default=default["position_baseline"],
        help="read the image score against the normal images' mean score map, position "
        "by position, so that what every normal image shows at a place (the border "
        "frame, a part's edges) does not set it; --no-position-baseline: the map's "
        "maximum, as in the paper (default: %(default)s)",
    )
    group.add_argument(
        "--contamination", type=_contamination_arg, default=default["contamination"],
        help="'auto' (threshold from held-out normal images) or the share of "
        "training images taken as anomalous (default: %(default)s)",
    )
    _add_runtime_options(group)
    _add_seed(group)


def _add_seed(parser):
    parser.add_argument(
        "--seed", type=int, default=_DEFAULT_SEED, help="random seed (default: %(default)s)"
    )


def _add_runtime_options(group, defaults_from_model=False):
    if defaults_from_model:
        batch_size = device = None
        shown = "the model's"
    else:
        batch_size, device = DETECTOR_DEFAULTS["batch_size"], DETECTOR_DEFAULTS["device"]
        shown = "%(default)s"
    group.add_argument(
        "--batch-size", type=_positive_int, default=batch_size, metavar="N",
        help=f"images per forward pass (default: {shown})",
    )
    group.add_argument(
        "--device", default=device, help=f"auto, cpu, cuda or cuda:N (default: {shown})"
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
    fit.add_argument(
        "--scheduler", default=None, metavar="ADDRESS",
        help="extract the training features on the Dask cluster of this scheduler; "
        "its workers read the images, so TRAIN must be paths they reach (needs pip "
        "install 'skprotoad[dask]')",
    )
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
        help="map value shown darkest (default: 0.5 x the pixel threshold)",
    )
    predict.add_argument(
        "--vmax", type=_finite_float, default=None,
        help="map value shown brightest (default: 1.5 x the pixel threshold)",
    )
    predict.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (default: 0.5)")
    predict.add_argument(
        "--report", action="store_true",
        help="also write OUT_DIR/report/: index.html with a contact sheet of the most "
        "anomalous images and the score histogram (needs matplotlib: pip install "
        "'skprotoad[report]')",
    )
    predict.add_argument(
        "--scheduler", default=None, metavar="ADDRESS",
        help="score on the Dask cluster of this scheduler (e.g. tcp://10.0.0.5:8786): "
        "its workers read the images and write the outputs, so IMAGE_OR_DIR and "
        "OUT_DIR must be paths they reach (needs pip install 'skprotoad[dask]')",
    )
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
    evaluate.add_argument(
        "--report", default=None, metavar="DIR",
        help="write a report to DIR: index.html with ROC and PRO curves, score histograms "
        "with the threshold, a table per defect type, the worst false alarms and misses "
        "(needs matplotlib: pip install 'skprotoad[report]')",
    )
    evaluate.add_argument("--force", action="store_true",
                          help="overwrite JSON / MODEL / the report if they exist")
    _add_common(evaluate)
    _add_detector_options(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    export = commands.add_parser(
        "export", help="write a fitted model as one ONNX or TorchScript file for a station",
        description="Export the whole inference path: uint8 images of any size in; anomaly "
        "maps, scores, verdicts and masks out, thresholds inside.",
        epilog=_EPILOG_EXPORT, formatter_class=formatter,
    )
    export.add_argument("model", metavar="MODEL",
                        help="model file written by 'skprotoad fit' (.joblib or .safetensors)")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="file to write: NAME.onnx, or NAME.pt for TorchScript")
    export.add_argument("--format", choices=("onnx", "torchscript"), default=None,
                        help="default: from FILE's extension (.pt, .pth: torchscript; "
                        "else onnx)")
    export.add_argument("--network-only", action="store_true",
                        help="export the network alone: its input is preprocessed float "
                        "images (skprotoad.export.preprocess)")
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    _add_common(export)
    export.set_defaults(handler=_cmd_export)

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
        "--clustering", choices=CLUSTERING_METHODS, default=DETECTOR_DEFAULTS["clustering"],
        help="how prototypes are learned (default: %(default)s)",
    )
    demo.add_argument("--n-clusters", type=_positive_int, default=DETECTOR_DEFAULTS["n_clusters"],
                      metavar="N", help="number of prototypes (required with kmeans)")
    _add_seed(demo)
    _add_common(demo)
    # Smaller problems for tests and quick checks; not part of the documented interface.
    demo.add_argument("--n-train", type=_positive_int, default=40, help=argparse.SUPPRESS)
    demo.add_argument("--n-test", type=_positive_int, default=30, help=argparse.SUPPRESS)
    demo.add_argument("--size", type=_positive_int, default=128, help=argparse.SUPPRESS)
    demo.add_argument("--backbone", default=DETECTOR_DEFAULTS["backbone"], help=argparse.SUPPRESS)
    demo.add_argument("--weights", type=_weights_arg, default=DETECTOR_DEFAULTS["weights"],
                      help=argparse.SUPPRESS)
    demo.add_argument("--device", default=DETECTOR_DEFAULTS["device"], help=argparse.SUPPRESS)
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
        # OSError covers FileNotFoundError and backbones.WeightsUnavailableError;
        # RuntimeError covers torch's (e.g. out of memory).
        if args.debug:
            raise
        _error(describe_error(exc))
        return EXIT_FAILURE
    except Exception as exc:  # a bug, or a library error of an unexpected type
        if args.debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the "
               f"traceback, and please report it)")
        return EXIT_FAILURE
    return EXIT_OK


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


def _report_skipped(skipped, limit=10):
    if not skipped:
        return
    _warn(f"skipped {len(skipped)} file(s):")
    for path, reason in skipped[:limit]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more", file=sys.stderr)


# Detector parameter <- command-line option, for the options a command has.
_DETECTOR_OPTIONS = {
    "backbone": "backbone",
    "layers": "layers",
    "weights": "weights",
    "clustering": "clustering",
    "n_clusters": "n_clusters",
    "n_farthest": "n_farthest",
    "max_patches": "max_patches",
    "sigma": "sigma",
    "alignment": "alignment",
    "neighborhood_size": "neighborhood_size",
    "normalization": "normalization",
    "image_score": "image_score",
    "map_metric": "map_metric",
    "score_whitening": "score_whitening",
    "position_baseline": "position_baseline",
    "image_size": "image_size",
    "crop_size": "crop_size",
    "padding": "padding",
    "contamination": "contamination",
    "batch_size": "batch_size",
    "device": "device",
    "random_state": "seed",
}


def _make_detector(args, **overrides):
    """The detector the options describe, its parameters checked.

    A value the estimator refuses whatever the data (``--clustering kmeans``
    without ``--n-clusters``, an even ``--neighborhood-size``, ...) is a usage
    error, exit code 2, reported before any image is read or generated.
    """
    from . import _images, _validation
    from .detector import ProtoADDetector

    params = {
        param: getattr(args, option)
        for param, option in _DETECTOR_OPTIONS.items()
        if hasattr(args, option)
    }
    if "layers" in params:
        params["layers"] = tuple(params["layers"])
    params.update(overrides)
    if params.get("crop_size") is _CROP_UNSET:
        scale = _images.is_scale(params.get("image_size"))
        params["crop_size"] = None if scale else DETECTOR_DEFAULTS["crop_size"]
    verbose = 0 if args.quiet else 2 if args.verbose else 1
    detector = ProtoADDetector(verbose=verbose, **params)
    try:
        # the checks fit starts with, of the parameters alone (no data, no
        # backbone): here they fail before minutes of reading images
        _validation.check_params(detector)
    except (ValueError, TypeError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return detector


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
    check_file_free(args.output, args.force, "model file")
    detector = _make_detector(args)
    if args.scheduler:
        _require_extra("--scheduler", "dask", "dask", "distributed")
    paths, skipped = collect_images(args.train, max_pixels=args.max_pixels)
    _report_skipped(skipped)
    require_images(paths, args.train)
    if args.scheduler:
        import joblib

        with _dask_client(args.scheduler), joblib.parallel_config(backend="dask"):
            _fit(args, detector, paths)
    else:
        _fit(args, detector, paths)
    save_model(detector, args.output, overwrite=args.force)
    print(f"saved model to {args.output} (fitted on {len(paths)} images)")


def _cmd_export(args):
    check_file_free(args.output, args.force, "export file")
    form = args.format or (
        "torchscript" if Path(args.output).suffix.lower() in (".pt", ".pth") else "onnx"
    )
    if form == "onnx":
        _require_extra("ONNX export", "export", "onnx", "onnxscript", "onnxruntime")
    from .export import to_onnx, to_torchscript

    detector = load_model(args.model)
    export = to_onnx if form == "onnx" else to_torchscript
    _info(args, f"exporting {'the network' if args.network_only else 'the whole inference path'}"
                f" as {form} (checked against the model) ...")
    try:
        with kept_if_created():
            export(detector, args.output, pipeline=not args.network_only, overwrite=args.force)
    except ValueError as exc:  # a scale-factor model, say
        raise CommandError(str(exc)) from None
    print(f"wrote {args.output} ({form}; threshold {-detector.offset_:.4g}, pixel threshold "
          f"{detector.pixel_threshold_:.4g})")


def _cmd_predict(args):
    from .batch_scoring import color_range, finish_result, new_result, score_and_write

    from ._validation import torch_device

    detector = load_model(args.model)
    out_dir = Path(args.output)
    overrides = {k: getattr(args, k) for k in ("batch_size", "device") if getattr(args, k) is not None}
    detector.set_params(verbose=False, **overrides)
    try:
        # checked here: in the scoring loop it would read as a problem of each file
        torch_device(detector.device)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        vmin, vmax = color_range(detector, args.threshold, args.vmin, args.vmax)
    except ValueError as exc:  # --vmin not below --vmax; the library names its parameters
        raise CommandError(str(exc).replace("vmin (", "--vmin (").replace("vmax (", "--vmax ("),
                           EXIT_USAGE) from None
    if not 0.0 <= args.alpha <= 1.0:
        raise CommandError(f"--alpha must be in [0, 1], got {args.alpha}.", EXIT_USAGE)
    if args.report:
        _require_extra("--report", "report", "matplotlib")
    if args.scheduler:
        _require_extra("--scheduler", "dask", "dask", "distributed")
    paths, skipped = collect_images(args.inputs, max_pixels=args.max_pixels)
    _report_skipped(skipped)
    require_images(paths, args.inputs)
    names = output_names(paths)
    planned = ["scores.csv", "skipped.csv", "run.json"]
    planned += [f"{folder}/{name}.png" for name in names for folder in OUTPUT_DIRS]
    if args.report:
        from .report import PREDICTION_FILES

        planned += [f"report/{f}" for f in PREDICTION_FILES]
    # connected before anything is written: an unreachable scheduler is a usage error
    client = _dask_client(args.scheduler) if args.scheduler else contextlib.nullcontext()
    with client:
        prepare_out_dir(out_dir, args.force, planned, "predict", inputs=paths)

        done = new_result()
        try:
            with _progress(args, len(paths), "predict") as bar:
                scoring = dict(names=names, out_dir=out_dir, threshold=args.threshold, vmin=vmin,
                               vmax=vmax, alpha=args.alpha, progress=bar, result=done)
                if args.scheduler:
                    from .distributed import score_and_write as score_on_dask

                    result = score_on_dask(detector, paths, client=client, **scoring)
                else:
                    result = score_and_write(detector, paths, **scoring)
        except (KeyboardInterrupt, Exception):
            # Ctrl-C, a full disk, a bug: the images done are listed all the same,
            # and run.json says the run is incomplete. Best effort: on a full disk
            # this may fail too, and the original error is what the user sees.
            with contextlib.suppress(Exception):
                _write_predict_results(args, detector, out_dir, paths, skipped,
                                       finish_result(done), vmin, vmax, complete=False)
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
        if args.report:
            import numpy as np
            from PIL import Image

            from .report import prediction_report

            def draw(k):  # the overlay just written
                with Image.open(out_dir / result["overlay"][k]) as img:
                    return np.asarray(img.convert("RGB"))

            written = prediction_report(
                out_dir / "report", result["score"], threshold, draw_example=draw,
                names=[Path(paths[i]).name for i in result["index"]], overwrite=True,
            )
            print(f"wrote {written['index']}")


def _dask_client(address):
    """A client of the Dask scheduler at ``address``, or a usage error."""
    from distributed import Client

    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise CommandError(f"--scheduler {address}: cannot reach the Dask scheduler "
                           f"({exc}).", EXIT_USAGE) from None


def _require_extra(purpose, extra, *modules):
    """Refuse, before any work, a command whose optional dependencies are missing."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise CommandError(
                f"{purpose} needs {name}: pip install 'skprotoad[{extra}]' (or {name}).",
                EXIT_USAGE,
            )


def _write_predict_results(args, detector, out_dir, paths, skipped, result, vmin, vmax,
                           complete):
    """Write scores.csv, skipped.csv and run.json; return all skipped files."""
    from .batch_scoring import pixel_threshold

    skipped = skipped + [(paths[i], reason) for i, reason in result["skipped"]]
    write_scores_csv(out_dir / "scores.csv", [paths[i] for i in result["index"]], result)
    if skipped:
        write_skipped_csv(out_dir / "skipped.csv", skipped)
    write_json(out_dir / "run.json", {
        "model": str(Path(args.model).resolve()),
        # false: interrupted or failed; scores.csv lists the images done
        "complete": complete,
        "threshold": -detector.offset_ if args.threshold is None else args.threshold,
        "pixel_threshold": pixel_threshold(detector, args.threshold),
        "vmin": vmin,
        "vmax": vmax,
        "n_images": len(result["index"]),
        "n_anomalies": int(result["anomaly"].sum()),
        "n_skipped": len(skipped),
        "skprotoad_version": __version__,
    })
    return skipped


def _load_dataset(args):
    from .datasets import load_btad, load_mvtec

    if not Path(args.root).is_dir():
        raise CommandError(f"no such data set folder: {args.root}", EXIT_USAGE)
    loader = load_btad if args.format == "btad" else load_mvtec
    try:
        return loader(args.root, args.category)
    except FileNotFoundError as exc:  # a category or mask that is not there
        raise CommandError(str(exc), EXIT_USAGE) from None


def _cmd_evaluate(args):
    from .batch_scoring import (
        compute_metrics,
        format_table,
        metric_maps_and_masks,
        per_type_auroc,
        score_and_write,
    )

    outputs = [("-o", args.output, "results file"), ("--save-model", args.save_model, "model file")]
    if args.report is not None:
        _require_extra("--report", "report", "matplotlib")
        from .report import EVALUATION_FILES

        outputs += [("--report", Path(args.report) / f, "report file") for f in EVALUATION_FILES]
    outputs = [output for output in outputs if output[1] is not None]
    # -o X --save-model X: the results would silently replace the model
    check_distinct_outputs([output[:2] for output in outputs], [("--report", args.report)])
    for _, path, what in outputs:
        check_file_free(path, args.force, what)
    detector = _make_detector(args)
    data = _load_dataset(args)
    fit_seconds = _fit(args, detector, data.train_paths)
    if args.save_model:
        save_model(detector, args.save_model, overwrite=args.force)
        _info(args, f"saved model to {args.save_model}")

    _info(args, f"scoring {len(data.test_paths)} test images ...")
    start = time.perf_counter()
    with _progress(args, len(data.test_paths), "scoring") as bar:
        result = score_and_write(detector, data.test_paths, keep_maps=True, strict=True, progress=bar)
    score_seconds = time.perf_counter() - start
    geometry, maps, masks = metric_maps_and_masks(detector, result, data.test_mask_paths)
    crop_maps, result["maps"] = result["maps"], None
    metrics = compute_metrics(data.test_labels, result["score"], masks, maps)
    if args.report is not None:
        written = _write_evaluation_report(args, detector, data, result, crop_maps, maps, masks)
        _info(args, f"wrote {written}")
    del maps, masks, crop_maps
    normal_name = "ok" if args.format == "btad" else "good"
    per_type = per_type_auroc(
        data.test_defect_types, data.test_labels, result["score"], normal_name
    )
    speed = len(data.test_paths) / score_seconds
    timing = [("fit time (s)", f"{fit_seconds:.1f}"), ("test images/s", f"{speed:.2f}")]
    name = args.category or Path(args.root).resolve().name
    print(f"{name}: {len(data.train_paths)} training images, {len(data.test_paths)} test "
          f"images ({int(data.test_labels.sum())} anomalous)")
    print(format_table(metrics, timing))
    if len(per_type) > 1:
        print("image AUROC per defect type: "
              + ", ".join(f"{k} {v:.3f}" for k, v in per_type.items()))
    if args.output:
        write_json(args.output, {
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
        }, overwrite=args.force)
        _info(args, f"wrote {args.output}")


def _write_evaluation_report(args, detector, data, result, crop_maps, maps, masks):
    """The evaluation report of ``evaluate --report``; returns its index.html."""
    from .batch_scoring import color_range, draw_overlay, pixel_threshold
    from .datasets import load_input_masks
    from .report import evaluation_report

    vmin, vmax = color_range(detector)
    pixel_t = pixel_threshold(detector)

    def draw(k):  # the k-th scored image, its prediction and its ground truth
        i = result["index"][k]
        size = result["size"][k]
        (truth,) = load_input_masks([data.test_mask_paths[i]], [size])
        picture, _ = draw_overlay(detector, data.test_paths[i], crop_maps[k], size,
                                  result["anomaly"][k], pixel_t, vmin, vmax, truth_mask=truth)
        return picture

    index = result["index"]
    name = args.category or Path(args.root).resolve().name
    with kept_if_created():
        written = evaluation_report(
            args.report, data.test_labels[index], result["score"], -detector.offset_,
            defect_types=[data.test_defect_types[i] for i in index],
            names=[f"{data.test_defect_types[i]}/{Path(data.test_paths[i]).name}" for i in index],
            masks=masks, maps=maps,
            draw_example=draw, title=f"skprotoad evaluation: {name}", overwrite=args.force,
        )
    return written["index"]


# Overlays the demo writes: this many anomalous and normal test images.
_DEMO_SHOWN = (6, 2)


def _demo_selection(labels):
    import numpy as np

    anomalous = np.flatnonzero(labels == 1)[: _DEMO_SHOWN[0]]
    normal = np.flatnonzero(labels == 0)[: _DEMO_SHOWN[1]]
    return np.concatenate([anomalous, normal])


def _cmd_demo(args):
    import numpy as np

    from .batch_scoring import compute_metrics, format_table, score_and_write
    from .datasets import make_defect_dataset
    from .plotting import PREDICTION_COLOR, TRUTH_COLOR, add_legend, grid, save_png

    detector = _make_detector(args, image_size=args.size, crop_size=args.size)
    # (generating the images takes a second; the fit is the work)
    data = make_defect_dataset(
        n_train=args.n_train, n_test=args.n_test, image_size=args.size, random_state=args.seed
    )
    names = [f"test_{i:03d}_{'defect' if y else 'normal'}" for i, y in enumerate(data.y_test)]
    shown = _demo_selection(data.y_test)
    planned = ["scores.csv", "results.json", "grid.png"]
    planned += [f"{folder}/{names[i]}.png" for i in shown for folder in OUTPUT_DIRS]
    # The demo's own folder: its earlier output is replaced without --force.
    out_dir = prepare_out_dir(args.output, args.force, planned, "demo", replace_own=True)
    _info(args, f"generated {args.n_train} normal training images and {args.n_test} test "
                f"images ({int(data.y_test.sum())} with defects) of {args.size} x {args.size} px")
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
    write_scores_csv(out_dir / "scores.csv", names, result, extra={"truth": truth})
    titles = [
        f"{'defect' if data.y_test[i] else 'normal'}, score {result['score'][i]:.3f} "
        f"({'anomaly' if result['anomaly'][i] else 'normal'})"
        for i in shown
    ]
    figure = grid(
        [out_dir / result["overlay"][i] for i in shown], titles=titles, ncols=4,
        tile_size=max(args.size, 192),
    )
    figure = add_legend(figure, [("predicted defect (the model)", PREDICTION_COLOR),
                                 ("true defect (ground truth)", TRUTH_COLOR)])
    save_png(figure, out_dir / "grid.png")
    speed = len(data.X_test) / score_seconds
    write_json(out_dir / "results.json", {
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
    print(f"wrote {len(shown)} overlays (predicted defects outlined in cyan, true ones in "
          f"green), grid.png, "
          f"scores.csv and results.json to {out_dir}")
