"""Image input: validation, loading and the model's input geometry.

Every accepted input form ends up as the same thing: a float32 RGB tensor in
[0, 1], resized (bilinear, antialiased) and, optionally, centre-cropped. Arrays
and files of the same pixels give the same tensor. Two geometries:

* **fixed size** (``image_size`` an int or (height, width)): every image is
  squashed to ``image_size`` and centre-cropped to ``crop_size`` (``None``: no
  crop), so all model inputs share one size;
* **scale** (``image_size`` a float): every image is resized by that one factor,
  keeping its aspect ratio, to the nearest multiple of the backbone's coarsest
  stride (at least 32 pixels per side) and is not cropped; input sizes then
  vary with the images' sizes.

Resizing runs in Pillow on float32 planes ("F" mode): the same antialiased
bilinear filter as ``torch.nn.functional.interpolate(..., antialias=True)`` to
float precision, single-threaded and much cheaper on one small image than
torch, whose thread pool only adds overhead at that size. Grey images are
resized once and replicated to three channels afterwards.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_unit_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Pillow modes of 16-bit and float images, refused: their scale is unknown.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_size(value, name, allow_none=False):
    """Return ``value`` as a (height, width) tuple of positive ints."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got {value!r}.")
    if min(value) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return (int(value[0]), int(value[1]))


# Largest scale factor accepted: beyond it, upsampling invents detail and a
# typo (image_size=75.0 meant as 0.75) would ask for enormous inputs.
MAX_SCALE = 4.0
# Smallest side of a scale-mode input: below it the coarse stages have a
# single cell or two and the features are mostly border effects.
MIN_SCALED_SIDE = 32


def is_scale(image_size):
    """Whether ``image_size`` is a scale factor (a float) rather than a size."""
    return isinstance(image_size, numbers.Real) and not isinstance(image_size, numbers.Integral)


# Largest side of a fixed model input (image_size, crop_size): a CNN input
# beyond it needs tens of GB, and a saved model's sizes are checked against it
# before anything is built from them.
MAX_INPUT_SIDE = 8192


def check_geometry(image_size, crop_size):
    """Validate ``image_size`` and ``crop_size`` together, as the detector takes them.

    Raises
    ------
    TypeError, ValueError
        For a malformed size, a crop larger than the image, a side above
        :data:`MAX_INPUT_SIDE`, a scale factor outside (0, 4], or a crop
        combined with a scale factor.
    """
    if is_scale(image_size):
        if not math.isfinite(image_size) or not 0 < image_size <= MAX_SCALE:
            raise ValueError(
                f"image_size as a float is a scale factor in (0, {MAX_SCALE:g}], got "
                f"{image_size!r}; pass an int or a (height, width) pair for a fixed size."
            )
        if crop_size is not None:
            raise ValueError(
                f"crop_size must be None when image_size is a scale factor "
                f"({image_size!r}): the whole resized image is scored; got "
                f"crop_size={crop_size!r}."
            )
        return
    center_crop_box(image_size, crop_size)
    if max(check_size(image_size, "image_size")) > MAX_INPUT_SIDE:
        raise ValueError(
            f"image_size must be at most {MAX_INPUT_SIDE} pixels a side, got {image_size!r}."
        )


def scaled_size(original_size, factor, multiple=1):
    """Size of an image resized by ``factor``, rounded to a multiple of ``multiple``.

    Each side is ``factor`` times the original, rounded to the nearest multiple
    of ``multiple`` (the backbone's coarsest stride, so that every stage tiles
    the image exactly) and at least the smallest multiple that reaches 32
    pixels. The aspect ratio is kept up to that rounding.

    Examples
    --------
    >>> scaled_size((300, 103), 0.75, 16)
    (224, 80)
    >>> scaled_size((20, 500), 0.75, 16)
    (32, 368)
    """
    multiple = int(multiple)
    smallest = -(-MIN_SCALED_SIDE // multiple) * multiple
    return tuple(
        max(smallest, int(round(side * factor / multiple)) * multiple) for side in original_size
    )


def input_size(original_size, image_size, crop_size, multiple=1):
    """(height, width) of the model input an image of ``original_size`` becomes."""
    if is_scale(image_size):
        return scaled_size(original_size, image_size, multiple)
    return center_crop_box(image_size, crop_size)[2:]


def size_batches(items, sizes, batch_size):
    """Batches of ``items`` that share a size, at most ``batch_size`` long.

    Groups come in order of first appearance, each in the given order.

    Examples
    --------
    >>> size_batches("abcde", [(2, 2), (4, 2), (2, 2), (2, 2), (4, 2)], 2)
    [['a', 'c'], ['d'], ['b', 'e']]
    """
    groups = {}
    for item, size in zip(items, sizes):
        groups.setdefault(tuple(size), []).append(item)
    return [
        group[s : s + batch_size]
        for group in groups.values()
        for s in range(0, len(group), batch_size)
    ]


def center_crop_box(image_size, crop_size):
    """Where the detector's centre crop lies in the resized image.

    Parameters
    ----------
    image_size : int or (height, width)
        Size every image is resized to (the detector's fixed ``image_size``).
    crop_size : int, (height, width) or None
        Size of the centre crop; ``None``: the whole resized image.

    Returns
    -------
    box : tuple of 4 ints
        ``(top, left, height, width)`` of the crop, in resized-image pixels;
        an odd margin leaves its extra pixel below and to the right.

    Examples
    --------
    >>> from skprotoad.preprocessing import center_crop_box
    >>> center_crop_box(256, 224)
    (16, 16, 224, 224)
    >>> center_crop_box((300, 200), None)  # no crop: the resized size
    (0, 0, 300, 200)
    """
    image_size = check_size(image_size, "image_size")
    crop_size = check_size(crop_size, "crop_size", allow_none=True) or image_size
    if crop_size[0] > image_size[0] or crop_size[1] > image_size[1]:
        raise ValueError(f"crop_size {crop_size} is larger than image_size {image_size}.")
    top = (image_size[0] - crop_size[0]) // 2
    left = (image_size[1] - crop_size[1]) // 2
    return top, left, crop_size[0], crop_size[1]


class ImageSequence:
    """A validated, lazily loaded sequence of images.

    Parameters
    ----------
    X : ndarray or sequence
        ``(N, H, W)`` or ``(N, H, W, C)`` array (C = 1 or 3) of uint8 or float in
        [0, 1]; or a list/tuple (or 1-D str or object array) whose items are file
        paths, PIL images or such arrays of one image each (sizes may differ).
    """

    def __init__(self, X, name="X"):
        self.name = name
        if isinstance(X, (str, os.PathLike)):
            raise TypeError(
                f"{name} must be a sequence of images; got a single path {str(X)!r}. "
                f"Wrap it in a list, or list a folder's files first."
            )
        if isinstance(X, np.ndarray) and X.dtype.kind in "OUS":
            # paths (np.array(paths), a DataFrame column's values) or ragged
            # images: the list they hold; checked before the shape, which an
            # array of images would have
            if X.ndim != 1:
                raise TypeError(
                    f"{name} is a {X.ndim}-D array of dtype {X.dtype}: pass images as a "
                    f"uint8 or float (N, H, W[, C]) array, file paths as a list or a 1-D "
                    f"array."
                )
            X = X.tolist()
        if isinstance(X, np.ndarray):
            self._array = _check_array_batch(X, name)
            self._items = None
        elif isinstance(X, Mapping):
            raise TypeError(
                f"{name} must be a sequence of images, got a {type(X).__name__}; pass "
                f"its values as a list."
            )
        elif _is_pil(X) or isinstance(X, torch.Tensor):
            raise TypeError(
                f"{name} must be a sequence of images; wrap a single image in a list"
                + (" and pass tensors as numpy arrays." if isinstance(X, torch.Tensor) else ".")
            )
        elif isinstance(X, (list, tuple)) or (hasattr(X, "__len__") and hasattr(X, "__getitem__")):
            items = list(X)
            for i, item in enumerate(items):
                _check_item_type(item, f"{name}[{i}]")
            self._array = None
            self._items = items
        else:
            raise TypeError(
                f"{name} must be an array of images or a list of paths, PIL images or "
                f"arrays; got {type(X).__name__}."
            )
        if len(self) == 0:
            raise ValueError(f"{name} is empty: at least one image is needed.")

    def __len__(self):
        return len(self._array) if self._array is not None else len(self._items)

    def load(self, index):
        """Image ``index`` as float32 (H, W) grey or (H, W, 3) RGB in [0, 1]."""
        if self._array is not None:
            return _as_float(self._array[index], f"{self.name}[{index}]", checked=True)
        return load_image(self._items[index], f"{self.name}[{index}]")

    def take(self, indices):
        """The input items at ``indices``, as given (an array or a list)."""
        indices = list(indices)
        if self._array is not None:
            return self._array[indices]
        return [self._items[i] for i in indices]

    def cache_token(self):
        """What identifies these images' content, for :func:`joblib.hash`.

        An array input is itself (joblib hashes its bytes); a list gives one
        entry per item: arrays and PIL images by their pixels, files by
        resolved path, size and modification time (not their bytes, which
        would mean reading every file twice). A file that cannot be found is
        left to the loader, which names it.
        """
        if self._array is not None:
            return self._array
        return [_item_token(item) for item in self._items]

    def original_size(self, index):
        """(height, width) of image ``index`` before resizing."""
        if self._array is not None:
            return tuple(self._array.shape[1:3])
        item = self._items[index]
        if isinstance(item, np.ndarray):
            return tuple(item.shape[:2])
        if _is_pil(item):
            return (item.height, item.width)
        with _open_image(item, f"{self.name}[{index}]") as img:
            return upright_size(img)

    def input_sizes(self, image_size, crop_size, multiple=1, indices=None):
        """Model input size (height, width) of each image of ``indices``.

        With a fixed ``image_size`` every image gets the crop size, without
        reading any image; with a scale factor each image's own size is read
        (for files, only their header).
        """
        order = range(len(self)) if indices is None else indices
        if not is_scale(image_size):
            size = input_size(None, image_size, crop_size)
            return [size for _ in order]
        return [input_size(self.original_size(i), image_size, None, multiple) for i in order]

    def plan(self, batch_size, image_size, crop_size, indices=None, multiple=1, sizes=None):
        """The chunks of indices :meth:`batches` yields, in that order.

        Images of one input size go into one batch: with a fixed size that is
        every image, in the given order; with a scale factor, see
        :func:`size_batches`. ``sizes`` are the images' input sizes from
        :meth:`input_sizes` when the caller has them already.
        """
        order = list(range(len(self)) if indices is None else indices)
        if not is_scale(image_size):
            return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        if sizes is None:
            sizes = self.input_sizes(image_size, crop_size, multiple, order)
        return size_batches(order, sizes, batch_size)

    def batches(self, batch_size, image_size, crop_size, indices=None, multiple=1, plan=None):
        """Yield ``(chunk_indices, tensor)``, tensors of shape (B, 3, height, width).

        ``multiple`` (the backbone's coarsest stride) rounds the sizes of a
        scale factor ``image_size``, see :func:`scaled_size`; ``plan`` is the
        chunking from :meth:`plan` when the caller has it already. Images
        are read batch by batch, in the calling thread: decoding the next
        batch in a background thread while the model ran measured slower
        on two cores (docs/benchmarks.md, "Speed"), where torch's threads
        already take both.
        """
        if plan is None:
            plan = self.plan(batch_size, image_size, crop_size, indices, multiple)
        for chunk in plan:
            if is_scale(image_size):
                tensors = []
                for i in chunk:
                    image = self.load(i)
                    size = scaled_size(image.shape[:2], image_size, multiple)
                    tensors.append(resize_and_crop(image, size, None))
            else:
                tensors = [resize_and_crop(self.load(i), image_size, crop_size) for i in chunk]
            yield chunk, torch.stack(tensors)


def resize_and_crop(image, image_size, crop_size):
    """One image resized and centre-cropped as the detector does it.

    Bilinear, antialiased resizing of each channel, then the crop of
    :func:`center_crop_box`; values clipped to [0, 1]; a grey image is
    replicated to three channels.

    Parameters
    ----------
    image : ndarray of shape (H, W) or (H, W, 3), float
        In [0, 1], as :func:`load_image` returns it.
    image_size : int or (height, width)
        Size to resize to (aspect ratio not kept).
    crop_size : int, (height, width) or None
        Size of the centre crop; ``None`` keeps the whole resized image.

    Returns
    -------
    tensor : torch.Tensor of shape (3, crop_height, crop_width), float32

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.preprocessing import resize_and_crop
    >>> image = np.full((40, 60), 0.5, dtype=np.float32)
    >>> tuple(resize_and_crop(image, 32, 24).shape)
    (3, 24, 24)
    """
    top, left, height, width = center_crop_box(image_size, crop_size)
    size_h, size_w = check_size(image_size, "image_size")
    planes = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = np.empty((len(planes), height, width), dtype=np.float32)
    for c, plane in enumerate(planes):
        if plane.shape != (size_h, size_w):
            plane = _resize_plane(plane, size_h, size_w)
        out[c] = plane[top : top + height, left : left + width]
    out = torch.from_numpy(np.clip(out, 0.0, 1.0, out=out))
    return out.expand(3, -1, -1).contiguous() if len(planes) == 1 else out


def _resize_plane(plane, height, width):
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(resized.resize((width, height), Image.BILINEAR))


def load_image(item, where="image"):
    """One image as the detector reads it: float32 in [0, 1], grey or RGB.

    Files are decoded by Pillow and turned as their EXIF orientation says
    (as viewers show them); palettes, CMYK, opaque alpha and the other
    8-bit modes become RGB; 16-bit and float images, and transparent pixels,
    are refused (their meaning is unknown). uint8 arrays are divided by 255.

    Parameters
    ----------
    item : str, path-like, PIL.Image.Image or ndarray
        A file, a PIL image, or a uint8 or [0, 1] float array of shape
        (H, W), (H, W, 1) or (H, W, 3).
    where : str, default="image"
        How error messages name the item.

    Returns
    -------
    image : ndarray of shape (H, W) or (H, W, 3), float32

    Raises
    ------
    ValueError, TypeError
        For a file that cannot be read or an image of a refused kind.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.preprocessing import load_image
    >>> image = load_image(np.full((2, 3, 3), 255, dtype=np.uint8))
    >>> image.dtype, float(image.max())
    (dtype('float32'), 1.0)
    """
    if isinstance(item, np.ndarray):
        return _as_float(item, where)
    if _is_pil(item):
        return _pil_to_float(item, where)
    path = Path(item)
    with _open_image(path, where) as img:
        try:
            img.load()
            upright(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{where}: cannot read image {path}: {exc}") from exc
        pixels = _pil_to_uint8(img, f"{where} ({path})")
    # Pillow's copy is freed before the float copy is made: less peak memory
    return _as_float(pixels, where, checked=True)


def _open_image(path, where):
    """``PIL.Image.open(path)``, every way it can fail a ValueError naming the file.

    Pillow's decompression-bomb guard (images of more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, 179 million by default, refused from
    their header) is kept: such an image would need gigabytes as floats.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{where}: image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{where}: {path} is a directory, not an image file.")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(
            f"{where}: {path} is too large to decode safely: {exc} If the file is "
            f"trusted and memory allows, raise PIL.Image.MAX_IMAGE_PIXELS; else "
            f"downscale it first."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read image {path}: {exc}") from exc


# EXIF tag asking viewers to flip or turn the stored pixels: orientations 2 to
# 8, of which 5 to 8 turn them a quarter, swapping width and height. Files are
# read as viewers show them, so that a camera's upright JPEG is scored upright.
_ORIENTATION = 0x0112


def _orientation(img):
    """EXIF orientation of an opened image (1: as stored), from its header."""
    from PIL import Image

    try:
        # Image.getexif, not PNG's, which decodes the pixels to look for EXIF after them
        return Image.Image.getexif(img).get(_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block (Pillow raises several kinds): read as stored
        return 1


def upright(img):
    """Turn a decoded image from a file as viewers show it, in place
    (:func:`PIL.ImageOps.exif_transpose`); returns it."""
    from PIL import ImageOps

    if _orientation(img) != 1:
        ImageOps.exif_transpose(img, in_place=True)
    return img


def upright_size(img):
    """(height, width) an opened image has once :func:`upright`, from its header only."""
    # Pillow turns TIFF images itself, their size included
    if _orientation(img) in (5, 6, 7, 8) and img.format != "TIFF":
        return (img.width, img.height)
    return (img.height, img.width)


def _item_token(item):
    if isinstance(item, np.ndarray):
        return item
    if _is_pil(item):
        # a palette image's pixels are its indices: the palette decides the colours
        palette = item.getpalette() if item.mode in ("P", "PA") else None
        return ("pil", item.mode, item.size, palette, np.asarray(item))
    return ("file", *file_identity(item))


def file_identity(path):
    """What tells a file's content from an earlier one's without reading it:
    its resolved path, size, modification time, and the inode and change
    time, which a copy that keeps the modification time (``cp -p``,
    ``rsync -a``, unpacking an archive) or a write that restores it cannot
    keep; ``("missing", path)`` when it cannot be read."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return ("missing", str(path))
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)


def _is_pil(obj):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def _check_item_type(item, where):
    if isinstance(item, (str, os.PathLike)) or _is_pil(item):
        return
    if isinstance(item, np.ndarray):
        _check_single_array(item, where)
        return
    raise TypeError(
        f"{where} must be a file path, a PIL image or a numpy array, "
        f"got {type(item).__name__}."
    )


def _check_dtype_and_range(arr, where):
    if arr.dtype == np.uint8:
        return
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{where} has dtype {arr.dtype}; use uint8 (0..255) or float in [0, 1]."
        )
    check_unit_range(arr, where)


def _check_channels(shape, where, batch):
    lead = "(N, H, W, C)" if batch else "(H, W, C)"
    if len(shape) == (4 if batch else 3):
        channels = shape[-1]
        if channels not in (1, 3):
            hint = ""
            if shape[-3] in (1, 3):
                hint = f" It looks channel-first: transpose to {lead}."
            elif channels == 4:
                hint = " RGBA is not accepted: drop the alpha channel."
            raise ValueError(
                f"{where} has shape {shape}: expected {lead} with C = 1 or 3 "
                f"channels last.{hint}"
            )
    elif len(shape) != (3 if batch else 2):
        expected = "(N, H, W) or (N, H, W, C)" if batch else "(H, W) or (H, W, C)"
        hint = ""
        if batch and len(shape) == 2:
            hint = f" For one grey image, pass {where}[None] or [image]."
        raise ValueError(f"{where} has shape {shape}: expected {expected}.{hint}")
    elif batch and len(shape) == 3 and shape[-1] in (1, 3) and min(shape[:2]) > 3:
        # (N, H, W) grey images 1 or 3 pixels wide: surely one image (H, W, C)
        kind = "RGB" if shape[-1] == 3 else "grey"
        raise ValueError(
            f"{where} has shape {shape}: read as (N, H, W), that would be {shape[0]} "
            f"images {shape[-1]} pixel(s) wide. It looks like one {kind} image "
            f"(H, W, C): pass {where}[None] or [image]."
        )
    if batch and shape[0] == 0:
        raise ValueError(f"{where} is empty: at least one image is needed.")
    if min(shape) == 0:
        raise ValueError(f"{where} has shape {shape}: an image needs at least one pixel.")


def _check_array_batch(X, name):
    _check_channels(X.shape, name, batch=True)
    _check_dtype_and_range(X, name)
    return X


def _check_single_array(arr, where):
    _check_channels(arr.shape, where, batch=False)
    _check_dtype_and_range(arr, where)


def _as_float(arr, where, checked=False):
    if not checked:
        _check_single_array(arr, where)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        out /= np.float32(255.0)  # in place: one float copy of a large image, not two
        return out
    return arr.astype(np.float32, copy=False)


def _pil_to_float(img, where):
    return _as_float(_pil_to_uint8(img, where), where, checked=True)


def _pil_to_uint8(img, where):
    """The pixels of a PIL image as a uint8 (H, W) or (H, W, 3) array."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        raise ValueError(
            f"{where} is a {img.mode} (16-bit or float) image; convert it to 8-bit, "
            f"or pass it as a float array scaled to [0, 1]."
        )
    if img.mode not in ("L", "RGB"):
        if _has_transparency(img):
            raise ValueError(
                f"{where} is a {img.mode} image with transparent pixels, whose colour is "
                f"undefined; composite it onto a background (or drop the alpha "
                f"channel) first."
            )
        # opaque alpha, palettes, CMYK, YCbCr, LAB, 1-bit: plain RGB
        try:
            # opaque premultiplied grey is plain grey; Pillow converts La to nothing
            img = img.getchannel("L") if img.mode == "La" else img.convert("RGB")
        except ValueError as exc:  # modes Pillow cannot convert
            raise ValueError(
                f"{where} is a {img.mode} image, which Pillow cannot convert to RGB "
                f"({exc}); save it as RGB or greyscale (L) first."
            ) from exc
    return np.asarray(img)


# Modes whose last band is alpha ("a": premultiplied). Not LAB, whose "A" is a
# colour axis.
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _has_transparency(img):
    if img.mode in _ALPHA_MODES:
        alpha = img.getchannel(img.getbands()[-1])
        return alpha.getextrema()[0] < 255
    if "transparency" in img.info:  # a palette entry or colour key marked transparent
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def crop_map_to_input(crop_map, original_size, image_size, crop_size):
    """Map an anomaly map on the model input back onto the original pixel grid.

    The inverse of the resize (and crop): each original pixel centre is carried
    into the model input's coordinates and the map is sampled there bilinearly.
    Pixels that a centre crop cut away have no score and are set to NaN. With a
    scale factor ``image_size`` the map covers the whole image, resized by
    slightly different factors along y and x after rounding to stride
    multiples: the map's own shape gives them, and no pixel is NaN.

    Parameters
    ----------
    crop_map : ndarray of shape (crop_height, crop_width)
    original_size : (height, width) of the input image
    image_size, crop_size : the model's geometry

    Returns
    -------
    ndarray of shape ``original_size``, float32
    """
    if is_scale(image_size):
        # the whole resized image is the model input
        size_h, size_w = crop_map.shape[-2:]
        top, left, crop_h, crop_w = 0, 0, size_h, size_w
    else:
        top, left, crop_h, crop_w = center_crop_box(image_size, crop_size)
        size_h, size_w = check_size(image_size, "image_size")
    height, width = original_size
    # pixel centres of the original image, in resized-image pixel units
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) * size_h / height - 0.5 - top
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) * size_w / width - 0.5 - left
    # grid_sample's normalised coordinates, align_corners=False: -1 and 1 are the
    # outer edges of the crop's border pixels
    gy = ((ys + 0.5) / crop_h * 2 - 1).float()
    gx = ((xs + 0.5) / crop_w * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    source = torch.as_tensor(crop_map, dtype=torch.float32)[None, None]
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out[0, 0]
    outside = (gy.abs() > 1)[:, None] | (gx.abs() > 1)[None, :]
    out[outside] = float("nan")
    return out.numpy()


def maps_on_inputs(maps, images, image_size, crop_size):
    """:func:`crop_map_to_input` of each of ``maps``, the maps of ``images``
    (an :class:`ImageSequence`): a list of maps on the images' own pixels."""
    return [
        crop_map_to_input(m, images.original_size(i), image_size, crop_size)
        for i, m in enumerate(maps)
    ]


def fixed_input_size(image_size, crop_size):
    """The model's one input size (the crop); None for a scale-factor ``image_size``.

    Examples
    --------
    >>> fixed_input_size(256, 224), fixed_input_size(0.5, None)
    ((224, 224), None)
    """
    if is_scale(image_size):
        return None
    return tuple(center_crop_box(image_size, crop_size)[2:])
