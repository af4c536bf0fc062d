"""Heatmap overlays and small report figures, with PIL and numpy only.

Everything here returns plain ``uint8`` RGB arrays of shape (H, W, 3), so the
results can be saved (:func:`save_png`), tiled (:func:`grid`) or shown with any
viewer; no display or plotting library is needed.

Examples
--------
>>> import numpy as np
>>> from skprotoad.plotting import overlay, grid
>>> image = np.full((32, 48), 128, dtype=np.uint8)
>>> heat = np.zeros((32, 48), dtype=np.float32)
>>> heat[10:20, 20:30] = 1.0
>>> rgb = overlay(image, heat, vmin=0.0, vmax=1.0)
>>> rgb.shape, rgb.dtype
((32, 48, 3), dtype('uint8'))
>>> grid([rgb, rgb, rgb], titles=["a", "b", "c"], ncols=2).dtype
dtype('uint8')
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ._checks import check_int, check_unit_range
from ._files import write_new_file
from ._masks import defect_pixels

__all__ = [
    "COLORMAPS", "PREDICTION_COLOR", "TRUTH_COLOR", "apply_colormap", "overlay", "contour",
    "draw_contour", "add_legend", "as_rgb_uint8", "save_png", "grid",
]

#: Outline colour of predicted defects (cyan: apart from every colour of the
#: inferno heatmap and from the ground truth's green).
PREDICTION_COLOR = (0, 255, 255)
#: Outline colour of ground-truth defects.
TRUTH_COLOR = (0, 255, 0)

# Anchor colours of each map, evenly spaced from low to high values; the
# 256-entry tables are linear interpolations between them. "inferno" is
# perceptually ordered (lightness grows with the value) and reads in greyscale
# print; "jet" is the map most anomaly-detection papers show.
_ANCHORS = {
    "inferno": (
        (0, 0, 4),
        (22, 11, 57),
        (66, 10, 104),
        (106, 23, 110),
        (147, 38, 103),
        (188, 55, 84),
        (221, 81, 58),
        (243, 120, 25),
        (252, 165, 10),
        (246, 215, 70),
        (252, 255, 164),
    ),
    "jet": (
        (0, 0, 128),
        (0, 0, 255),
        (0, 128, 255),
        (0, 255, 255),
        (128, 255, 128),
        (255, 255, 0),
        (255, 128, 0),
        (255, 0, 0),
        (128, 0, 0),
    ),
    "gray": ((0, 0, 0), (255, 255, 255)),
}


def _build_table(anchors, n=256):
    anchors = np.asarray(anchors, dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    samples = np.linspace(0.0, 1.0, n)
    table = np.stack([np.interp(samples, positions, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


COLORMAPS = {name: _build_table(anchors) for name, anchors in _ANCHORS.items()}
"""Colour lookup tables, name -> uint8 array of shape (256, 3), low to high."""


def _colormap_table(colormap):
    if isinstance(colormap, str):
        try:
            return COLORMAPS[colormap]
        except KeyError:
            raise ValueError(
                f"unknown colormap {colormap!r}; use one of {sorted(COLORMAPS)} "
                f"or a (256, 3) uint8 table."
            ) from None
    table = np.asarray(colormap)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) < 2:
        hint = ""
        if table.ndim == 2 and table.shape[1] == 4:
            hint = " (matplotlib's RGBA tables: drop the alpha column, table[:, :3])"
        raise ValueError(f"a colormap table must have shape (n, 3), got {table.shape}{hint}.")
    if table.dtype.kind == "f":
        # matplotlib's form; cast to uint8 as it is, it would be all but black
        if not (np.isfinite(table).all() and table.min() >= 0.0 and table.max() <= 1.0):
            raise ValueError(
                f"colormap: a float table must lie in [0, 1] (matplotlib's form), got "
                f"values in [{table.min():g}, {table.max():g}]; give 0..255 colours as "
                f"integers."
            )
        return np.round(table * 255).astype(np.uint8)
    if table.dtype.kind not in "iu":
        raise TypeError(
            f"colormap: a table must hold integers in 0..255 or floats in [0, 1], got "
            f"dtype {table.dtype}."
        )
    if table.min() < 0 or table.max() > 255:
        # uint8 would wrap them around (300 -> 44): another colour, silently
        raise ValueError(
            f"colormap: an integer table must lie in 0..255, got values in "
            f"[{table.min()}, {table.max()}]."
        )
    return table.astype(np.uint8)


def apply_colormap(values, vmin=None, vmax=None, colormap="inferno"):
    """Colour a 2-D array of values; NaN becomes black.

    Parameters
    ----------
    values : array-like of shape (H, W)
        NaN marks values that do not exist (pixels not scored); +inf and
        -inf are values like others, beyond every range: they get the
        highest and the lowest colour.
    vmin, vmax : float, default=None
        Values mapped to the lowest and highest colour; values outside are
        clipped. ``None`` takes the finite minimum / maximum of ``values``.
    colormap : str or array of shape (n, 3), default="inferno"
        A name in :data:`COLORMAPS` or a lookup table of your own: integers
        in 0..255, or floats in [0, 1] (matplotlib's form, as
        ``matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]``).

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)

    Examples
    --------
    >>> apply_colormap([[0.0, 1.0]], colormap="gray")[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (H, W), got shape {values.shape}.")
    table = _colormap_table(colormap)
    vmin, vmax = _value_range(values, vmin, vmax)
    # NaN alone is "no value"; +-inf scale to +-inf and are clipped to the ends
    scored = ~np.isnan(values)
    scaled = np.zeros_like(values)
    if vmax > vmin:
        scaled[scored] = (values[scored] - vmin) / (vmax - vmin)
    else:
        # A flat range: everything at or above it is "high", the rest "low".
        scaled[scored] = (values[scored] >= vmax).astype(np.float64)
    index = np.round(np.clip(scaled, 0.0, 1.0) * (len(table) - 1)).astype(np.intp)
    rgb = table[index]
    rgb[~scored] = 0
    return rgb


def _value_range(values, vmin, vmax):
    finite = values[np.isfinite(values)]
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    vmin, vmax = float(vmin), float(vmax)
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise ValueError(f"vmin and vmax must be finite, got {vmin} and {vmax}.")
    if vmin > vmax:
        raise ValueError(f"vmin ({vmin}) must not be greater than vmax ({vmax}).")
    return vmin, vmax


def as_rgb_uint8(image, where="image"):
    """Any image form (array, PIL image, path) as an (H, W, 3) uint8 array.

    Files and PIL images are read as the detector reads them
    (:func:`skprotoad.preprocessing.load_image`): turned as their EXIF
    orientation says; 16-bit and float images and transparent pixels refused,
    as their colours are unknown. Arrays must be uint8, bool, or float in
    [0, 1]; anything else is refused too, not clipped to black or white.
    """
    if isinstance(image, (str, os.PathLike, Image.Image)):
        # here: it imports torch, which drawing arrays does not need
        from ._images import load_image

        # k / 255 in float32 times 255 rounds back to k: the file's own pixels
        image = np.round(load_image(image, where) * 255).astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"{where} must have shape (H, W) or (H, W, 3), got {arr.shape}.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{where} must be uint8 or float in [0, 1], got {arr.dtype}.")
        check_unit_range(arr, where)
        arr = np.round(arr * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def _as_mask(mask, shape):
    # read as the evaluation reads mask files: 0/1, 16-bit and coloured masks too
    if isinstance(mask, (str, os.PathLike)):
        from ._images import upright  # here: it imports torch, which drawing does not need

        with Image.open(mask) as img:
            mask = defect_pixels(upright(img))
    elif isinstance(mask, Image.Image):
        mask = defect_pixels(mask)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask has shape {mask.shape}, the image {tuple(shape)}.")
    return mask.astype(bool) if mask.dtype == bool else mask > 0


def contour(mask):
    """The 1-pixel outline just outside a boolean mask.

    The pixels outside the mask with one of their 4 neighbours inside
    (``dilate(mask) & ~mask``), so that the defect itself stays visible under
    its outline, even a defect of a pixel or two; where the mask reaches the
    image's edge, its pixels on the edge are outlined instead, so that a
    defect at the border is closed in too.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
    >>> int(contour(m).sum()), bool((contour(m) & m).any())
    (12, False)
    """
    mask = np.asarray(mask, dtype=bool)
    edge = np.zeros_like(mask)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return (ndimage.binary_dilation(mask) & ~mask) | (mask & edge)


def draw_contour(image, mask, color=(0, 255, 0)):
    """Draw the 1-pixel outline of ``mask`` (:func:`contour`) onto a copy of ``image``.

    Parameters
    ----------
    image : array, PIL image or path
        Any form :func:`overlay` accepts.
    mask : array of shape (H, W), PIL image or path
        Nonzero (or, for image files, > 127) pixels are inside.
    color : tuple of 3 ints, default=(0, 255, 0)

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.plotting import draw_contour
    >>> mask = np.zeros((8, 8), dtype=bool)
    >>> mask[2:6, 2:6] = True
    >>> rgb = draw_contour(np.zeros((8, 8), dtype=np.uint8), mask)
    >>> int((rgb[..., 1] == 255).sum())  # the 16 pixels around a 4 x 4 square
    16
    """
    rgb = as_rgb_uint8(image).copy()
    rgb[contour(_as_mask(mask, rgb.shape[:2]))] = np.asarray(color, dtype=np.uint8)
    return rgb


def overlay(
    image,
    anomaly_map,
    *,
    alpha=0.5,
    vmin=None,
    vmax=None,
    colormap="inferno",
    mask=None,
    contour_color=(0, 255, 0),
):
    """Blend a coloured anomaly map over its image.

    Parameters
    ----------
    image : array of shape (H, W[, 3]), PIL image or path
        uint8, or float in [0, 1]; grey images are shown in grey. Files and PIL
        images are read as the detector reads them: 16-bit and float images
        are refused, as 16-bit arrays are, and so are transparent pixels.
    anomaly_map : array of shape (H, W)
        Higher = more anomalous, on the image's own pixel grid, such as one map
        of ``detector.anomaly_maps(X, output="input")``. NaN marks pixels that
        were not scored (cut away by the centre crop): there the image is shown
        as it is, unblended. +inf is scored, as anomalous as can be: it gets
        the hottest colour (and -inf the coldest), as values beyond ``vmax``
        (``vmin``) do.
    alpha : float in [0, 1], default=0.5
        Weight of the heatmap; 0 shows only the image, 1 only the heatmap.
    vmin, vmax : float, default=None
        Map values shown with the lowest and highest colour. Leaving them None
        stretches each map to its own range, so every image shows a "hot" spot
        and colours cannot be compared between images. For comparable colours
        pass the same range for all images, e.g. one anchored at the detector's
        ``pixel_threshold_`` (``vmin=0.5 * t, vmax=1.5 * t`` puts the threshold
        in the middle of the colour scale).
    colormap : str or array of shape (n, 3), default="inferno"
        ``"inferno"`` (dark = normal, bright yellow = anomalous), ``"jet"``
        (blue to red), ``"gray"``, or a lookup table of your own.
    mask : array of shape (H, W), PIL image or path, default=None
        A defect mask (ground truth or prediction) whose 1-pixel outline
        (:func:`contour`) is drawn on top; the masked pixels stay as they are.
    contour_color : tuple of 3 ints, default=(0, 255, 0)
        Colour of that outline (:data:`PREDICTION_COLOR` and
        :data:`TRUTH_COLOR` are the command line's).

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((4, 4, 3), dtype=np.uint8)
    >>> heat = np.full((4, 4), np.nan); heat[0, 0] = 1.0
    >>> out = overlay(image, heat, alpha=1.0, vmin=0, vmax=1)
    >>> out[0, 0].tolist(), out[3, 3].tolist()
    ([252, 255, 164], [0, 0, 0])
    """
    rgb = as_rgb_uint8(image)
    heat = np.asarray(anomaly_map, dtype=np.float64)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(
            f"anomaly_map has shape {heat.shape} but the image is {rgb.shape[:2]}; "
            f"use detector.anomaly_maps(X, output='input') for maps at the images' sizes."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    colored = apply_colormap(heat, vmin, vmax, colormap).astype(np.float64)
    weight = np.where(np.isnan(heat), 0.0, float(alpha))[..., None]
    out = np.round((1.0 - weight) * rgb + weight * colored).astype(np.uint8)
    if mask is not None:
        out[contour(_as_mask(mask, heat.shape))] = np.asarray(contour_color, dtype=np.uint8)
    return out


def add_legend(image, entries, background=255):
    """A copy of ``image`` with a strip below it naming each outline colour.

    Parameters
    ----------
    image : array, PIL image or path
        Any form :func:`overlay` accepts.
    entries : sequence of (str, tuple of 3 ints)
        ``(label, colour)``, one line each: a colour swatch, then the label.
    background : int in [0, 255], default=255
        Grey level of the strip.

    Returns
    -------
    rgb : ndarray of uint8, shape (H + strip, W, 3)

    Examples
    --------
    >>> import numpy as np
    >>> out = add_legend(np.zeros((40, 120, 3), np.uint8), [("predicted", PREDICTION_COLOR)])
    >>> out.shape[0] > 40, bool((out[40:] == PREDICTION_COLOR).all(axis=-1).any())
    (True, True)
    """
    background = check_int(background, "background", 0, 255)
    rgb = as_rgb_uint8(image)
    if not entries:
        return rgb.copy()
    font = ImageFont.load_default()
    line = 14
    strip = Image.new("RGB", (rgb.shape[1], line * len(entries) + 4), (background,) * 3)
    draw = ImageDraw.Draw(strip)
    for i, (label, color) in enumerate(entries):
        top = 2 + i * line
        draw.rectangle([3, top + 2, 13, top + 11], fill=tuple(int(c) for c in color))
        draw.text((18, top), _fit_text(draw, str(label), font, rgb.shape[1] - 20),
                  fill=(0, 0, 0), font=font)
    return np.concatenate([rgb, np.asarray(strip)], axis=0)


def save_png(array, path):
    """Write an image array as a PNG file, creating missing parent folders.

    The file is written to a temporary file next to it and moved into place,
    so it is never seen half written; an existing file is replaced.

    Parameters
    ----------
    array : ndarray of shape (H, W) or (H, W, 3)
        uint8, bool (saved as 0 / 255) or float in [0, 1].
    path : str or path-like

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> from skprotoad.plotting import save_png
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_png(np.eye(4, dtype=bool), f"{tmp}/sub/mask.png")
    ...     Image.open(path).getpixel((1, 1))
    255
    """
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = as_rgb_uint8(arr, "array") if arr.ndim == 3 else as_rgb_uint8(arr)[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"array must have shape (H, W) or (H, W, 3), got {arr.shape}.")
    # atomic: an interrupted or failed write leaves no truncated PNG
    return write_new_file(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"),
                          overwrite=True)


def _fit_into(rgb, height, width, background):
    """Resize ``rgb`` to fit (height, width), keeping its aspect; centre it."""
    h, w = rgb.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        # Nearest when enlarging keeps pixels crisp; area-like when shrinking.
        resample = Image.NEAREST if scale > 1 else Image.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample))
    tile = np.full((height, width, 3), background, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    tile[top : top + new_h, left : left + new_w] = rgb
    return tile


def _fit_text(draw, text, font, width):
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid(images, titles=None, ncols=4, tile_size=None, pad=4, background=255):
    """Tile images into one report figure, each with an optional title strip.

    Parameters
    ----------
    images : sequence of arrays, PIL images or paths
        Any form :func:`overlay` accepts; sizes may differ.
    titles : sequence of str, default=None
        One title per image, drawn above it with PIL's default font; too long
        titles are shortened with "...".
    ncols : int, default=4
        Tiles per row (fewer when there are fewer images).
    tile_size : int or (height, width), default=None
        Size of each tile in pixels, at least 1; defaults to the largest image
        height and width. Images are scaled to fit their tile, keeping their
        aspect.
    pad : int, default=4
        Pixels between tiles and around the figure, at least 0.
    background : int in [0, 255], default=255
        Grey level of the background.

    Returns
    -------
    figure : ndarray of uint8, shape (H, W, 3)
        With ``n_rows = ceil(n / ncols)`` and ``strip`` the title strip height
        (0 without titles), ``H = n_rows * (tile_h + strip) + (n_rows + 1) * pad``
        and ``W = ncols * tile_w + (ncols + 1) * pad``.

    Examples
    --------
    >>> import numpy as np
    >>> tiles = [np.zeros((10, 20, 3), np.uint8)] * 3
    >>> grid(tiles, ncols=2, pad=1).shape
    (23, 43, 3)
    """
    if tile_size is not None:
        if np.ndim(tile_size) == 0:
            tile_size = (tile_size, tile_size)
        elif np.ndim(tile_size) != 1 or len(tile_size) != 2:
            raise ValueError(f"tile_size must be an int or (height, width), got {tile_size!r}.")
        tile_size = tuple(check_int(v, "tile_size", 1) for v in tile_size)
    pad = check_int(pad, "pad", 0)
    background = check_int(background, "background", 0, 255)
    rgbs = [as_rgb_uint8(image, f"images[{i}]") for i, image in enumerate(images)]
    if not rgbs:
        raise ValueError("images is empty: nothing to tile.")
    if titles is not None and len(titles) != len(rgbs):
        raise ValueError(f"got {len(titles)} titles for {len(rgbs)} images.")
    ncols = min(check_int(ncols, "ncols", 1), len(rgbs))
    nrows = -(-len(rgbs) // ncols)
    if tile_size is None:
        tile_h, tile_w = max(r.shape[0] for r in rgbs), max(r.shape[1] for r in rgbs)
    else:
        tile_h, tile_w = tile_size
    font = ImageFont.load_default()
    strip = 0
    if titles is not None:
        # Height of the font's tallest glyphs, so every title gets the same strip.
        left, top, right, bottom = font.getbbox("Ag|")
        strip = int(bottom) + 2 * max(pad // 2, 1)

    fig_h = nrows * (tile_h + strip) + (nrows + 1) * pad
    fig_w = ncols * tile_w + (ncols + 1) * pad
    figure = Image.new("RGB", (fig_w, fig_h), (background,) * 3)
    draw = ImageDraw.Draw(figure)
    text_color = (0, 0, 0) if background > 127 else (255, 255, 255)
    for i, rgb in enumerate(rgbs):
        row, col = divmod(i, ncols)
        x = pad + col * (tile_w + pad)
        y = pad + row * (tile_h + strip + pad)
        if titles is not None:
            text = _fit_text(draw, str(titles[i]), font, tile_w)
            draw.text((x, y + max(pad // 2, 1)), text, fill=text_color, font=font)
        figure.paste(Image.fromarray(_fit_into(rgb, tile_h, tile_w, background)), (x, y + strip))
    return np.asarray(figure)
