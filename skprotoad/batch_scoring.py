"""Scoring many images and writing their overlays and masks; test-set metrics.

The one scoring loop of the command line's ``predict``, ``evaluate`` and
``demo`` (:func:`score_and_write`): images are scored in chunks, so memory does
not grow with their number, unreadable images are isolated and skipped, and
each image's heatmap overlay and predicted mask are written at (at most 2048 x
2048 pixels of) the image's own size. :func:`compute_metrics` and
:func:`format_table` report a scored test set.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_is_fitted

from . import _images, _validation
from .cli_files import describe_error

__all__ = [
    "pixel_threshold", "color_range", "check_scoring_inputs", "score_and_write", "draw_overlay",
    "new_result", "finish_result",
    "metric_maps_and_masks", "compute_metrics", "per_type_auroc", "format_table",
]

# Overlays and masks of larger images are written scaled down to at most this
# many pixels (2048 x 2048): at the image's own size, drawing a 178-megapixel
# image's overlay took 17 GB (drawing costs about 60 bytes an output pixel).
MAX_OUTPUT_PIXELS = 2048 * 2048
#: Overlays of smaller images are enlarged to this shorter side, to be read.
MIN_OVERLAY_SIDE = 256
# Colour range of the overlays, as multiples of the image threshold: the
# threshold sits mid-scale, well below it is dark, 1.5 times it saturates.
_VMIN_FACTOR, _VMAX_FACTOR = 0.5, 1.5


def pixel_threshold(detector, threshold=None):
    """Map value above which a pixel is a defect.

    Parameters
    ----------
    detector : fitted ProtoADDetector
    threshold : float, default=None
        The user's image threshold: it applies to pixels too where the image
        score is the map's maximum; otherwise (and when None) the detector's
        own ``pixel_threshold_`` is used.

    Returns
    -------
    threshold : float
    """
    if threshold is None or not detector.network_.score_is_map_max:
        return detector.pixel_threshold_
    return float(threshold)


def color_range(detector, threshold=None, vmin=None, vmax=None):
    """The fixed (vmin, vmax) of the overlays, anchored at the pixel threshold.

    Defaults put the threshold in the middle of the colour scale: maps at half
    the threshold or less are dark, maps at 1.5 times or more saturate. The
    same range for every image makes the colours comparable across images.
    ``threshold`` (the user's) counts only where it applies to pixels too.

    Parameters
    ----------
    detector : fitted ProtoADDetector
    threshold, vmin, vmax : float, default=None
        The user's image threshold and colour range; None: the defaults.

    Returns
    -------
    vmin, vmax : float

    Raises
    ------
    ValueError
        If ``vmin`` is not below ``vmax``.
    """
    t = pixel_threshold(detector, threshold)
    if t <= 0:
        # No scale to anchor at: the whole range of 1 - cosine (distances
        # with normalization="image" have no fixed range; 0..2 still shows them).
        default_min, default_max = 0.0, 2.0
    else:
        default_min, default_max = _VMIN_FACTOR * t, _VMAX_FACTOR * t
    vmin = default_min if vmin is None else float(vmin)
    vmax = default_max if vmax is None else float(vmax)
    if not vmin < vmax:
        raise ValueError(f"vmin ({vmin:g}) must be below vmax ({vmax:g}).")
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
        Writes ``overlays/<name>.png`` (heatmap at the image's own size,
        enlarged by an integer factor to a shorter side of at least
        ``MIN_OVERLAY_SIDE`` pixels, or as far as 2048 x 2048 pixels allow;
        the predicted mask outlined in ``PREDICTION_COLOR``, ``truth_masks``
        if given in ``TRUTH_COLOR``) and
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
        Ground truth, outlined in the overlays next to the prediction.
    keep_maps : bool, default=False
        Return the crop-geometry anomaly maps (for metrics): an array, or a
        list when the model's input size varies (a scale-factor
        ``image_size``).
    strict : bool, default=False
        Raise on an unreadable image instead of skipping it.
    progress : tqdm bar, default=None
        Advanced by one per image.
    result : dict, default=None
        An empty result from :func:`new_result`, filled as images are done
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
    from .plotting import save_png

    check_scoring_inputs(detector, len(items), names, out_dir, threshold, write, truth_masks)
    offset = detector.offset_ if threshold is None else -float(threshold)
    pixel_t = pixel_threshold(detector, threshold)
    sequence = _images.ImageSequence(items, name="images")
    crop = detector.network_.input_size
    if out_dir is not None:
        out_dir = Path(out_dir)
        if vmin is None or vmax is None:
            vmin, vmax = color_range(detector, threshold, vmin, vmax)
    result = new_result() if result is None else result
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
                picture, predicted = draw_overlay(
                    detector, items[index], crop_map, size, anomaly, pixel_t, vmin, vmax,
                    alpha, None if truth_masks is None else truth_masks[index],
                )
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
    return finish_result(result, keep_maps, crop)


def check_scoring_inputs(detector, n_items, names=None, out_dir=None, threshold=None,
                         write=None, truth_masks=None):
    """Refuse, before any image is read or file written, what
    :func:`score_and_write` would otherwise fail on part way, or take for a
    problem of every image (a model changed after fit would have every image
    skipped, and the run return nothing, without an error).

    Parameters
    ----------
    detector : ProtoADDetector
    n_items : int
    names, out_dir, threshold, write, truth_masks
        As :func:`score_and_write`'s.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``detector`` is not fitted.
    ValueError
        If there is no item, the detector's ``device`` is not valid or a
        parameter changed after fit; ``threshold`` is not finite; ``out_dir``
        comes without one name per item, or two names are the same (ignoring
        case, as some file systems do: one image's overlay would replace the
        other's); ``write`` or ``truth_masks`` do not have one entry per item.
    """
    check_is_fitted(detector, "network_")
    if n_items == 0:
        raise ValueError("images is empty: nothing to score.")
    _validation.torch_device(detector.device)
    _validation.check_unchanged_since_fit(detector)
    if threshold is not None:
        _validation.check_threshold(threshold)
    if out_dir is not None:
        if names is None or len(names) != n_items:
            got = "none" if names is None else len(names)
            raise ValueError(f"out_dir needs names: one output name per item ({n_items}), "
                             f"got {got}.")
        counts = Counter(str(name).casefold() for name in names)
        repeated = [name for name in names if counts[str(name).casefold()] > 1]
        if repeated:
            raise ValueError(
                f"names must differ (ignoring case): each names an image's overlay and "
                f"mask files, which another image of the same name would replace; "
                f"repeated: {sorted(set(map(str, repeated)))[:4]}."
            )
    for key, value in (("write", write), ("truth_masks", truth_masks)):
        if value is not None and len(value) != n_items:
            raise ValueError(f"{key} must have one entry per item ({n_items}), "
                             f"got {len(value)}.")


def draw_overlay(detector, item, crop_map, size, anomaly, pixel_threshold, vmin, vmax,
                 alpha=0.5, truth_mask=None):
    """One image's overlay and predicted mask, as ``predict`` writes them.

    Parameters
    ----------
    detector : fitted ProtoADDetector
    item : path or image array
    crop_map : 2-D array
        The image's map on the model's input (``anomaly_maps(output="crop")``).
    size : (int, int)
        The image's own (height, width).
    anomaly : bool
        Its verdict: the mask follows it (:meth:`ProtoADDetector.predict_masks`).
    pixel_threshold, vmin, vmax, alpha : float
    truth_mask : 2-D bool array, default=None
        Ground truth at any size, outlined in ``TRUTH_COLOR``.

    Returns
    -------
    picture : ndarray of uint8 (H', W', 3)
        At the image's size, scaled down to ``MAX_OUTPUT_PIXELS`` (bounded
        memory: 17 GB for one 178-megapixel image at its own size) or enlarged
        to a ``MIN_OVERLAY_SIDE`` shorter side (within ``MAX_OUTPUT_PIXELS``);
        the prediction outlined in
        ``PREDICTION_COLOR``.
    predicted : ndarray of bool
        The predicted mask at the image's size, scaled down like the picture.
    """
    from ._masks import verdict_mask
    from .plotting import PREDICTION_COLOR, TRUTH_COLOR, draw_contour, overlay

    crop = detector.network_.input_size
    shown = _output_size(size)
    heat = _images.crop_map_to_input(crop_map, shown, detector.image_size, crop)
    predicted = verdict_mask(heat, anomaly, pixel_threshold)
    view = _overlay_size(shown)
    if view != shown:
        heat = _images.crop_map_to_input(crop_map, view, detector.image_size, crop)
    image = item if view == tuple(size) else _resized_image(item, view)
    picture = overlay(image, heat, alpha=alpha, vmin=vmin, vmax=vmax,
                      mask=_resized_mask(predicted, view), contour_color=PREDICTION_COLOR)
    if truth_mask is not None:
        picture = draw_contour(picture, _resized_mask(truth_mask, view), TRUTH_COLOR)
    return picture, predicted


def new_result():
    """An empty result for :func:`score_and_write` to fill.

    Returns
    -------
    result : dict of str to list
    """
    return {k: [] for k in ("index", "score", "anomaly", "size", "overlay", "mask", "maps",
                            "skipped")}


def finish_result(result, keep_maps=False, crop=None):
    """The lists of :func:`score_and_write` as arrays, in a new dict.

    Parameters
    ----------
    result : dict
        A result :func:`score_and_write` filled, completely or not.
    keep_maps : bool, default=False
        Keep the maps (else ``maps`` is None).
    crop : (int, int), default=None
        The model's fixed input size: maps are then stacked into one array;
        None (a scale-factor ``image_size``): kept as a list.

    Returns
    -------
    result : dict
    """
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
    if height * width <= MAX_OUTPUT_PIXELS:
        return tuple(size)
    factor = math.sqrt(MAX_OUTPUT_PIXELS / (height * width))
    return max(1, int(height * factor)), max(1, int(width * factor))


def _overlay_size(size):
    """(height, width) of the overlay of an image of ``size``: enlarged by an
    integer factor until its shorter side has ``MIN_OVERLAY_SIDE`` pixels, or
    by the largest factor that keeps it within ``MAX_OUTPUT_PIXELS``."""
    height, width = size
    factor = min(math.ceil(MIN_OVERLAY_SIDE / max(1, min(height, width))),
                 math.isqrt(MAX_OUTPUT_PIXELS // max(1, height * width)))
    return (height * factor, width * factor) if factor > 1 else tuple(size)


def _resized_image(item, size):
    """Image ``item`` (path or array) as uint8 RGB of ``size``, without a
    full-size float copy."""
    from PIL import Image

    from .plotting import as_rgb_uint8

    height, width = size
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            # JPEG: decode at a fraction of the size, given in stored pixels
            turned = _images.upright_size(img) != (img.height, img.width)
            img.draft("RGB", (height, width) if turned else (width, height))
            img = _images.upright(img)
            if img.mode == "La":  # the only mode Pillow converts to nothing (opaque here)
                img = img.getchannel("L")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            small = img.resize((width, height), Image.BILINEAR, reducing_gap=2.0)
    else:
        small = Image.fromarray(as_rgb_uint8(item)).resize((width, height), Image.BILINEAR)
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
        if len(chunk) == 1:
            reason = _skip_reason(exc, items[chunk[0]])
            if strict:
                # the detector names the image by its place in the chunk: name
                # it by the caller's index
                error = ValueError if isinstance(exc, ValueError) else OSError
                raise error(f"image {chunk[0]}: {reason}") from exc
            skipped.append((chunk[0], reason))
            return
    # One image of the chunk is unreadable (a truncated file, say): find it.
    for index in chunk:
        yield from _score_chunk(detector, items, [index], strict, skipped)


def _skip_reason(exc, item):
    """Why ``item``, scored alone, failed: the detector's message without the
    ``X[0]`` it names the item by (its index in the one-image retry, not the
    caller's), so that a file is named once, by its path. Arrays are checked
    before scoring starts: only files fail here."""
    message = describe_error(exc)
    # the loader's forms: "X[0] (path) is ..." and "X[0]: ... path ..."
    named = f"X[0] ({Path(item)}) " if isinstance(item, (str, os.PathLike)) else None
    if named and message.startswith(named):
        return f"{Path(item)} {message[len(named):]}"
    return message.removeprefix("X[0]: ")


def metric_maps_and_masks(detector, result, mask_paths):
    """A scored test set's anomaly maps and ground-truth masks, in one geometry.

    Parameters
    ----------
    detector : fitted ProtoADDetector
    result : dict
        From :func:`score_and_write` with ``keep_maps=True``.
    mask_paths : list of str or None
        Each test image's mask file; None for a normal image.

    Returns
    -------
    geometry : {"crop", "input"}
        "crop": maps and masks on the model's input (a fixed ``image_size``);
        "input": at each image's own size (a scale-factor ``image_size``).
    maps, masks : array of shape (n, h, w), or lists of 2-D arrays
    """
    from .datasets import load_input_masks, load_masks

    if detector.network_.input_size is None:
        # Scale geometry: the map covers the whole image; compare each map with
        # its mask at the image's own size (no common grid to resample to).
        maps = [
            _images.crop_map_to_input(m, size, detector.image_size, None)
            for m, size in zip(result["maps"], result["size"])
        ]
        return "input", maps, load_input_masks(mask_paths, result["size"])
    masks = load_masks(mask_paths, detector.image_size, detector.crop_size)
    return "crop", result["maps"], masks


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
    """Metrics (and extra rows) as an aligned two-column table.

    Parameters
    ----------
    metrics : dict
        From :func:`compute_metrics`.
    extra : sequence of (str, str), default=()
        More (label, text) rows, after the metrics.

    Returns
    -------
    table : str
    """
    rows = [(label, f"{metrics[key]:.4f}") for key, label in _METRIC_LABELS if key in metrics]
    rows += list(extra)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>10}" for label, value in rows)


def per_type_auroc(types, labels, scores, normal_name):
    """Image AUROC of each defect type against the normal test images.

    Parameters
    ----------
    types : sequence of str
        Each test image's defect type.
    labels : array of int, 1 = anomalous
    scores : array of float, higher = more anomalous
    normal_name : str
        The type of the normal images ("good", "ok").

    Returns
    -------
    auroc : dict of str to float
        Empty without normal images.
    """
    from .metrics import image_auroc

    types = np.asarray(types)
    normal = types == normal_name
    out = {}
    for name in sorted(set(types[~normal].tolist())):
        keep = normal | (types == name)
        if normal.any():
            out[name] = image_auroc(labels[keep], scores[keep])
    return out
