"""Dataset loaders and synthetic data generators for anomaly detection.

Loaders return file paths, not pixels, so that large datasets can be
streamed by the estimator. Masks can be loaded with :func:`load_masks` in the
model's input geometry (square resize, then centre crop), which is the
geometry the anomaly maps come out in.

Errors follow one rule: a path the caller names, or a file the layout
promises (such as the mask of a defect image), that does not exist raises
:class:`FileNotFoundError`; a folder whose structure is not the expected
layout (missing ``train/good``, no images) raises :class:`ValueError`.
"""

import numbers
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.utils import Bunch, check_random_state

from ._images import IMAGE_EXTENSIONS, center_crop_box, check_size, upright, upright_size
from ._masks import defect_pixels

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_mvtec",
    "load_btad",
    "load_folder",
    "load_masks",
    "load_input_masks",
    "make_defect_images",
    "make_defect_dataset",
]


# Mask file names tried for an image ``<stem>.<ext>``, in order of preference.
_MASK_SUFFIXES = ("_mask", "")

DEFECT_TYPES = ("scratch", "spot", "hole")


# --------------------------------------------------------------------------
# File system helpers
# --------------------------------------------------------------------------


def _is_image(path):
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _list_images(directory):
    """Image files directly in ``directory``, sorted by name. Images in its
    sub-folders are not read, and a warning says so, rather than let a fit or
    an evaluation run on fewer images than the folder holds."""
    # one listing; its entries know their type without a stat per file
    with os.scandir(directory) as listing:
        entries = [entry for entry in listing if not entry.name.startswith(".")]
    nested = sorted(
        entry.name for entry in entries
        if entry.is_dir() and any(_is_image(q) for q in Path(entry.path).iterdir())
    )
    if nested:
        warnings.warn(
            f"{str(directory)!r} has sub-folders of images that are not read (only the "
            f"images directly in it are): {nested[:4]}; move them up to include them.",
            UserWarning, stacklevel=3,
        )
    images = (Path(entry.path) for entry in entries
              if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(images, key=lambda p: p.name)


def _warn_unused_masks(mask_dir, index, used):
    """A mask that matches no image is a sign of a renamed or misplaced image,
    whose defect would then be missing from the evaluation."""
    unused = sorted(p.name for p in index.values() if p not in used)
    if unused:
        warnings.warn(
            f"{len(unused)} mask(s) in {str(mask_dir)!r} match no image and are not "
            f"used: {unused[:4]}.", UserWarning, stacklevel=2,
        )


def _subdirs(directory):
    return sorted(
        p.name for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a directory.")
    return path


def _mask_index(directory):
    """Map (stem, suffix) of every image file in ``directory`` to its path.

    Built once per folder so that lookups do not hit the file system per
    image, and so that extensions match case-insensitively.
    """
    if directory is None or not Path(directory).is_dir():
        return {}
    return {(p.stem, p.suffix.lower()): p for p in _list_images(directory)}


def _find_mask(index, stem):
    """Mask path for image ``stem``: ``<stem>_mask.png`` first, then others."""
    extensions = (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png")
    for suffix in _MASK_SUFFIXES:
        for ext in extensions:
            path = index.get((stem + suffix, ext))
            if path is not None:
                return path
    return None


def _check_unique_stems(images):
    """Two defect images of one stem (``001.png``, ``001.jpg``) would share a mask."""
    stems = Counter(p.stem for p in images)
    shared = sorted(str(p) for p in images if stems[p.stem] > 1)
    if shared:
        raise ValueError(
            f"defect images share a file name stem, so one mask would serve them all: "
            f"{shared[:4]}; rename or remove one of each."
        )


def _check_mask_fits(image, mask):
    """Open the mask's header now, not after a fit: it must be a readable image
    of its image's aspect (a mask at another resolution is resized; one of
    another shape, a transposed one say, belongs to another picture)."""
    sizes = []
    for path in (image, mask):
        try:
            with Image.open(path) as opened:
                sizes.append(upright_size(opened))
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None
    (height, width), (mask_height, mask_width) = sizes
    if abs(mask_height * width - height * mask_width) > 0.02 * height * mask_width:
        raise ValueError(
            f"mask {str(mask)!r} is {mask_height} x {mask_width} pixels, its image "
            f"{str(image)!r} {height} x {width}: not the same picture's shape (height x width)."
        )


def _defect_masks(images, index, mask_dir):
    """Each defect image's mask from ``index``, checked against its image."""
    _check_unique_stems(images)
    masks = []
    for image in images:
        mask = _find_mask(index, image.stem)
        if mask is None:
            raise _missing_mask_error(image, mask_dir)
        _check_mask_fits(image, mask)
        masks.append(mask)
    _warn_unused_masks(mask_dir, index, set(masks))
    return masks


def _missing_mask_error(image, mask_dir):
    return FileNotFoundError(
        f"no ground truth mask for defect image {str(image)!r}: looked for "
        f"'{image.stem}_mask.png' or '{image.stem}.<ext>' (ext in "
        f"{', '.join(IMAGE_EXTENSIONS)}) in {str(mask_dir)!r}."
    )


# --------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------


def _category_dir(root, category, dataset):
    root = _require_dir(root, f"{dataset} root")
    if category is None:
        return root
    if not isinstance(category, str):
        raise ValueError(f"category must be a string or None, got {category!r}.")
    path = root / category
    if not path.is_dir():
        available = [name for name in _subdirs(root) if (root / name / "train").is_dir()]
        raise FileNotFoundError(
            f"category {category!r} not found in {str(root)!r}; available "
            f"categories: {available or 'none'}."
        )
    return path


def _load_split_layout(cat_dir, normal_name, dataset, category_given):
    """Shared reader for the ``train/<normal>``, ``test/<type>`` layout."""
    train_dir = cat_dir / "train" / normal_name
    if not train_dir.is_dir():
        hint = ""
        if not category_given:
            candidates = [n for n in _subdirs(cat_dir) if (cat_dir / n / "train").is_dir()]
            if candidates:
                hint = f" It looks like a dataset root: pass its category, one of {candidates}."
        raise ValueError(
            f"{str(cat_dir)!r} is not a {dataset} category folder: "
            f"'train/{normal_name}' is missing.{hint}"
        )
    train_paths = _list_images(train_dir)
    if not train_paths:
        raise ValueError(f"no training images ({', '.join(IMAGE_EXTENSIONS)}) in {str(train_dir)!r}.")

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise ValueError(f"{str(cat_dir)!r} has no 'test' folder.")
    test_paths, labels, mask_paths, types = [], [], [], []
    defect_types = _subdirs(test_dir)
    for defect_type in defect_types:
        images = _list_images(test_dir / defect_type)
        is_normal = defect_type == normal_name
        mask_dir = cat_dir / "ground_truth" / defect_type
        index = {} if is_normal else _mask_index(mask_dir)
        masks = [None] * len(images) if is_normal else _defect_masks(images, index, mask_dir)
        test_paths += [str(image) for image in images]
        labels += [0 if is_normal else 1] * len(images)
        mask_paths += [None if mask is None else str(mask) for mask in masks]
        types += [defect_type] * len(images)
    truth_dir = cat_dir / "ground_truth"
    orphans = [n for n in _subdirs(truth_dir) if n not in defect_types] if truth_dir.is_dir() else []
    if orphans:
        warnings.warn(
            f"ground truth folders without a test folder are not used: {orphans} in "
            f"{str(truth_dir)!r}.", UserWarning, stacklevel=2,
        )
    return Bunch(
        train_paths=[str(p) for p in train_paths],
        test_paths=test_paths,
        test_labels=np.asarray(labels, dtype=int),
        test_mask_paths=mask_paths,
        test_defect_types=types,
    )


def load_mvtec(root, category=None):
    """Load file paths of a dataset in MVTec AD layout.

    The expected layout of a category folder is::

        train/good/*.png
        test/good/*.png
        test/<defect_type>/*.png
        ground_truth/<defect_type>/<stem>_mask.png

    Images may have any of the extensions in ``IMAGE_EXTENSIONS``
    (case-insensitive). A mask may also be named ``<stem>.<ext>``.

    Parameters
    ----------
    root : str or path-like
        Dataset root (holding one folder per category) or, when ``category``
        is None, a category folder itself.
    category : str or None, default=None
        Name of the category folder under ``root``.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        With fields ``train_paths`` (list of str, ``train/good``),
        ``test_paths`` (list of str), ``test_labels`` (ndarray of int, 0 normal
        and 1 anomalous), ``test_mask_paths`` (list of str or None, None for
        normal images), ``test_defect_types`` (list of str, ``"good"`` for
        normal images), ``root`` (str) and ``category`` (str or None). Test
        images are ordered by defect type, then file name.

    Raises
    ------
    FileNotFoundError
        If ``root`` or the category does not exist (the message lists the
        available categories), or a defect image has no mask.
    ValueError
        If the folder does not have the layout above or holds no training
        image.

    Warns
    -----
    UserWarning
        When images lie in sub-folders of an image folder (they are not
        read), a mask matches no image, or a ``ground_truth`` folder has no
        test folder.

    Examples
    --------
    >>> from skprotoad.datasets import load_mvtec
    >>> data = load_mvtec("data/magnetic_tile")  # doctest: +SKIP
    >>> len(data.train_paths), data.test_labels.sum()  # doctest: +SKIP
    (761, 392)
    """
    cat_dir = _category_dir(root, category, "MVTec AD")
    data = _load_split_layout(cat_dir, "good", "MVTec AD", category is not None)
    data.root = str(root)
    data.category = category
    return data


def load_btad(root, category=None):
    """Load file paths of a dataset in BTAD layout.

    The expected layout of a category folder (``01``, ``02``, ``03`` in BTAD)
    is::

        train/ok/*.bmp
        test/ok/*.bmp
        test/ko/*.bmp
        ground_truth/ko/<stem>.png

    Images and masks may have any extension in ``IMAGE_EXTENSIONS``; a mask
    has the stem of its image (``<stem>_mask`` is accepted too).

    Parameters
    ----------
    root : str or path-like
        BTAD root or, when ``category`` is None, a category folder.
    category : str or None, default=None
        Name of the category folder under ``root``, e.g. ``"01"``.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Same fields as :func:`load_mvtec`; ``test_defect_types`` holds
        ``"ok"`` or ``"ko"``.

    Raises
    ------
    FileNotFoundError
        If ``root`` or the category does not exist, or a ``ko`` image has no
        mask.
    ValueError
        If the folder does not have the layout above or holds no training
        image.

    Warns
    -----
    UserWarning
        When images lie in sub-folders of an image folder (they are not
        read), a mask matches no image, or a ``ground_truth`` folder has no
        test folder.

    Examples
    --------
    >>> from skprotoad.datasets import load_btad
    >>> data = load_btad("data/BTAD", "01")  # doctest: +SKIP
    >>> sorted(set(data.test_defect_types))  # doctest: +SKIP
    ['ko', 'ok']
    """
    cat_dir = _category_dir(root, category, "BTAD")
    data = _load_split_layout(cat_dir, "ok", "BTAD", category is not None)
    data.root = str(root)
    data.category = category
    return data


def load_folder(normal_dir, abnormal_dir=None, mask_dir=None):
    """Load file paths from plain folders of normal and anomalous images.

    Parameters
    ----------
    normal_dir : str or path-like
        Folder of normal images.
    abnormal_dir : str or path-like, default=None
        Folder of anomalous images.
    mask_dir : str or path-like, default=None
        Folder of masks for the anomalous images, named ``<stem>_mask.<ext>``
        or ``<stem>.<ext>``. When given, every anomalous image needs one.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        With fields ``paths`` (list of str; normal images first, each group
        sorted by name), ``labels`` (ndarray of int, 1 anomalous) and
        ``mask_paths`` (list of str or None).

    Raises
    ------
    FileNotFoundError
        If a folder does not exist, or an anomalous image has no mask.
    ValueError
        If ``normal_dir`` holds no image, a mask cannot be read or has
        another shape than its image, or two anomalous images share a stem.

    Warns
    -----
    UserWarning
        When images lie in sub-folders of a folder (they are not read) or a
        mask in ``mask_dir`` matches no image.

    Examples
    --------
    >>> from skprotoad.datasets import load_folder
    >>> data = load_folder("images/ok", "images/defect")  # doctest: +SKIP
    """
    normal = _list_images(_require_dir(normal_dir, "normal_dir"))
    if not normal:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(normal_dir)!r}.")
    abnormal = []
    if abnormal_dir is not None:
        abnormal = _list_images(_require_dir(abnormal_dir, "abnormal_dir"))
    elif mask_dir is not None:
        raise ValueError("mask_dir was given without abnormal_dir.")
    masks = [None] * len(abnormal)
    if mask_dir is not None:
        index = _mask_index(_require_dir(mask_dir, "mask_dir"))
        masks = _defect_masks(abnormal, index, mask_dir)
    return Bunch(
        paths=[str(p) for p in normal + abnormal],
        labels=np.asarray([0] * len(normal) + [1] * len(abnormal), dtype=int),
        mask_paths=[None] * len(normal) + [None if m is None else str(m) for m in masks],
    )


# --------------------------------------------------------------------------
# Mask geometry
# --------------------------------------------------------------------------


def load_masks(mask_paths, image_size=256, crop_size=None):
    """Load binary masks in the model's input geometry.

    Each mask's defect pixels are those of any channel above half the
    mask's own maximum (0/255, 0/1, 16-bit, float, coloured or palette masks
    alike; an all-zero mask is empty), turned as its EXIF orientation says,
    resized to ``image_size`` with nearest-neighbour interpolation (the images
    are resized bilinearly to the same size) and centre-cropped to
    ``crop_size``.

    Parameters
    ----------
    mask_paths : sequence of (str, path-like or None)
        Mask files; None stands for an all-normal mask.
    image_size : int or (height, width), default=256
        Size the images are resized to.
    crop_size : int, (height, width) or None, default=None
        Size of the centre crop taken from the resized image; ``None``: the
        whole resized image (the detector's default).

    Returns
    -------
    masks : ndarray of bool, shape (n_masks, crop_height, crop_width)

    Examples
    --------
    >>> from skprotoad.datasets import load_masks
    >>> load_masks([None, None], image_size=8, crop_size=6).shape
    (2, 6, 6)
    """
    top, left, height, width = center_crop_box(image_size, crop_size)
    full_size = check_size(image_size, "image_size")
    masks = np.zeros((len(mask_paths), height, width), dtype=bool)
    for i, path in enumerate(mask_paths):
        if path is not None:
            masks[i] = _read_mask(path, full_size)[top:top + height, left:left + width]
    return masks


def _read_mask(path, size):
    """A mask file's defect pixels (:func:`skprotoad._masks.defect_pixels`), resized (nearest)
    to ``size`` (h, w)."""
    height, width = size
    with Image.open(path) as image:
        mask = defect_pixels(upright(image))
    if mask.shape != (height, width):
        resized = Image.fromarray(mask).resize((width, height), Image.NEAREST)
        mask = np.asarray(resized)
    return mask


def load_input_masks(mask_paths, sizes):
    """Load binary masks at each image's own size, for maps in input geometry.

    The counterpart of :func:`load_masks` for maps carried back onto the input
    images (``anomaly_maps(X, output="input")``), e.g. with a scale-factor
    ``image_size``, where images and maps differ in size.

    Parameters
    ----------
    mask_paths : sequence of (str, path-like or None)
        Mask files; None stands for an all-normal mask.
    sizes : sequence of (height, width)
        Size of each image; a mask of another size is resized to it with
        nearest-neighbour interpolation.

    Returns
    -------
    masks : list of ndarray of bool, shape ``sizes[i]``
        Each mask's defect pixels, read as :func:`load_masks` reads them.

    Examples
    --------
    >>> from skprotoad.datasets import load_input_masks
    >>> [m.shape for m in load_input_masks([None, None], [(4, 6), (5, 3)])]
    [(4, 6), (5, 3)]
    """
    if len(mask_paths) != len(sizes):
        raise ValueError(
            f"mask_paths and sizes must have the same length, got {len(mask_paths)} "
            f"and {len(sizes)}."
        )
    masks = []
    for path, size in zip(mask_paths, sizes):
        size = check_size(tuple(size), "size")
        masks.append(np.zeros(size, dtype=bool) if path is None else _read_mask(path, size))
    return masks


# --------------------------------------------------------------------------
# Synthetic defect images
# --------------------------------------------------------------------------

# Grey-level standard deviation of the texture; defect contrasts are
# multiples of it so that defects are visible but not trivially so.
_TEXTURE_STD = 20.0
_TINT = np.array([1.0, 0.96, 0.88])


def _unit_noise(rng, shape, sigma):
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / field.std()


def _texture(rng, shape):
    """Grey-level surface: periodic weave + horizontal grain + slow shading.

    All images share the same recipe; only phases and noise differ, so
    normal images vary but have the same statistics.
    """
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    # Product of sines has variance 1/4; the factor 2 brings it to 1.
    weave = 2 * np.sin(2 * np.pi * rows / 8 + phase[0]) * np.sin(2 * np.pi * cols / 8 + phase[1])
    grain = _unit_noise(rng, shape, (0.7, 3.0))
    shading = _unit_noise(rng, shape, 8.0)
    weights = np.array([0.5, 0.7, 0.4])
    combined = weights[0] * weave + weights[1] * grain + weights[2] * shading
    return 128.0 + _TEXTURE_STD * combined / np.sqrt(np.sum(weights**2))


def _scratch(rng, shape, rows, cols):
    """Thin bright or dark line segment of random orientation."""
    size = min(shape)
    length = rng.uniform(0.3, 0.6) * size
    angle = rng.uniform(0, np.pi)
    center = rng.uniform(0.2, 0.8, size=2) * shape
    direction = np.array([np.sin(angle), np.cos(angle)])
    start = center - 0.5 * length * direction
    # Distance from each pixel centre to the segment.
    rel_r, rel_c = rows - start[0], cols - start[1]
    t = np.clip(rel_r * direction[0] + rel_c * direction[1], 0, length)
    dist = np.hypot(rel_r - t * direction[0], rel_c - t * direction[1])
    mask = dist <= rng.uniform(0.6, 1.2)
    delta = rng.choice([-1, 1]) * rng.uniform(1.5, 2.5) * _TEXTURE_STD
    return mask, np.where(mask, delta, 0.0)


def _spot(rng, shape, rows, cols):
    """Rotated elliptical blob, strongest at its centre."""
    size = min(shape)
    center = rng.uniform(0.15, 0.85, size=2) * shape
    radii = np.maximum(rng.uniform(0.05, 0.12, size=2) * size, 2.0)
    angle = rng.uniform(0, np.pi)
    dr, dc = rows - center[0], cols - center[1]
    u = (dr * np.cos(angle) + dc * np.sin(angle)) / radii[0]
    v = (-dr * np.sin(angle) + dc * np.cos(angle)) / radii[1]
    r2 = u**2 + v**2
    mask = r2 <= 1.0
    amplitude = rng.choice([-1, 1]) * rng.uniform(1.5, 2.5) * _TEXTURE_STD
    # At least half the amplitude at the rim so that every mask pixel changes.
    return mask, np.where(mask, amplitude * (1.0 - 0.5 * r2), 0.0)


def _hole(rng, shape, rows, cols, image):
    """Dark disc keeping a faint texture, surrounded by a bright rim."""
    size = min(shape)
    center = rng.uniform(0.15, 0.85, size=2) * shape
    radius = max(rng.uniform(0.04, 0.09) * size, 2.5)
    r = np.hypot(rows - center[0], cols - center[1])
    mask = r <= radius
    inner = r <= radius - 1.0
    dark = 128.0 - rng.uniform(2.0, 3.0) * _TEXTURE_STD + 0.3 * (image - 128.0)
    target = np.where(inner, dark, image + 1.5 * _TEXTURE_STD)
    return mask, np.where(mask, target - image, 0.0)


def _make_sample(rng, shape, defect_types, anomalous):
    """One image: (clean grey texture, grey image with defects, mask)."""
    clean = _texture(rng, shape)
    image = clean.copy()
    mask = np.zeros(shape, dtype=bool)
    if anomalous:
        rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
        n_defects = 1 + int(rng.random() < 0.3)
        for _ in range(n_defects):
            kind = defect_types[rng.integers(len(defect_types))]
            if kind == "scratch":
                region, delta = _scratch(rng, shape, rows, cols)
            elif kind == "spot":
                region, delta = _spot(rng, shape, rows, cols)
            else:
                region, delta = _hole(rng, shape, rows, cols, image)
            image += delta
            mask |= region
    return clean, image, mask


# Small screw-like objects at a random pose on a plain background: the case
# where normal images differ by position and rotation and defects are small
# next to that variation (MVTec AD's screws, parts on a conveyor).
OBJECT_DEFECT_TYPES = ("notch", "scratch", "bump")
_BACKGROUND = 185.0


def _object_frame(rng, shape, rows, cols):
    """Pixel coordinates in a random object pose: (u along the axis, v across),
    and the pose's size parameters."""
    size = min(shape)
    length = rng.uniform(0.30, 0.34) * size
    width = rng.uniform(0.07, 0.08) * size
    head = 1.7 * width
    # the whole object (shaft plus head) stays inside the central 80 %
    reach = 0.5 * length + 0.5 * head + width
    margin = np.array(shape) / 2 - reach
    center = np.array(shape) / 2 + rng.uniform(-1, 1, size=2) * np.maximum(margin - 0.1 * size, 0)
    angle = rng.uniform(0, 2 * np.pi)
    dr, dc = rows - center[0], cols - center[1]
    u = dr * np.cos(angle) + dc * np.sin(angle)
    v = -dr * np.sin(angle) + dc * np.cos(angle)
    return u, v, length, width, head


def _object(rng, shape, rows, cols):
    """Grey image of one screw (threaded shaft and a head) and its frame.

    Returns (image, (u, v), coverage, parameters); coverage is the
    anti-aliased object opacity in [0, 1].
    """
    u, v, length, width, head = _object_frame(rng, shape, rows, cols)
    period = 0.45 * width
    phase = rng.uniform(0, 1)
    thread = np.abs(((u / period + phase) % 1.0) - 0.5) * 2  # triangle wave in [0, 1]
    half_width = 0.5 * width * (0.82 + 0.18 * thread)
    on_shaft = (u >= -0.5 * length) & (u <= 0.5 * length)
    shaft_distance = np.where(on_shaft, np.abs(v) - half_width, np.inf)
    # a rounded head at the u < 0 end
    head_u = u + 0.5 * length + 0.25 * head
    head_distance = np.hypot(head_u / 0.5, v) - 0.5 * head
    distance = np.minimum(shaft_distance, head_distance)
    coverage = np.clip(0.5 - distance, 0.0, 1.0)
    # a cylinder's shading across the axis, thread grooves along it, a slot on the head
    across = np.clip(np.abs(v) / (0.5 * head), 0, 1)
    metal = 70.0 + 70.0 * (1 - across**2) * rng.uniform(0.9, 1.1)
    grooves = np.where(on_shaft, -25.0 * thread, 0.0)
    slot = np.where((np.abs(head_u) < 0.08 * head) & (np.abs(v) < 0.35 * head), -45.0, 0.0)
    obj = metal + grooves + slot
    background = _BACKGROUND + 3.0 * _unit_noise(rng, shape, 1.0)
    image = background + coverage * (obj - background)
    return image, (u, v), coverage, (length, width, head, background, obj)


def _object_defect(rng, kind, frame, coverage, params, image):
    """(mask, image with the defect): one small defect of ``kind`` on the object;
    only the mask's pixels change."""
    u, v = frame
    length, width, head, background, obj = params
    along = rng.uniform(-0.35, 0.45) * length
    side = rng.choice([-1.0, 1.0])
    if kind == "notch":
        # a bite out of the thread: background where metal was
        bite = ((u - along) / (0.45 * width)) ** 2 + ((v - side * 0.5 * width) / (0.4 * width)) ** 2
        mask = (bite <= 1) & (coverage > 0)
        new = background
    elif kind == "bump":
        # extra material on the outline: dark metal where background was
        blob = ((u - along) / (0.35 * width)) ** 2 + ((v - side * 0.6 * width) / (0.3 * width)) ** 2
        mask = (blob <= 1) & (coverage < 1)
        new = np.full_like(image, 80.0)
    else:
        # a bright scratch across the shaft
        angle = rng.uniform(0.3, np.pi - 0.3)
        du, dv = u - along, v
        distance = np.abs(du * np.sin(angle) - dv * np.cos(angle))
        extent = np.abs(du * np.cos(angle) + dv * np.sin(angle))
        mask = (distance <= rng.uniform(0.7, 1.1)) & (extent <= 0.6 * width) & (coverage > 0.5)
        new = image + rng.uniform(60, 90)
    return mask, np.where(mask, new, image)


def _make_object_sample(rng, shape, defect_types, anomalous):
    """One image of an object: (grey image, mask)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    image, frame, coverage, params = _object(rng, shape, rows, cols)
    mask = np.zeros(shape, dtype=bool)
    if anomalous:
        # redraw until the defect changes pixels (a tiny object at a small size)
        for _ in range(10):
            kind = defect_types[rng.integers(len(defect_types))]
            region, defective = _object_defect(rng, kind, frame, coverage, params, image)
            if region.any():
                image, mask = defective, region
                break
    return image, mask


def _to_rgb(gray):
    rgb = np.clip(gray[..., None] * _TINT, 0, 255)
    return np.round(rgb).astype(np.uint8)


def _check_generator_params(n_samples, image_size, anomaly_ratio, defect_types, kind="texture"):
    if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int, got {n_samples!r}.")
    shape = check_size(image_size, "image_size")
    if min(shape) < 16:
        raise ValueError(f"image_size must be at least 16 pixels per side, got {shape}.")
    if not isinstance(anomaly_ratio, numbers.Real) or not 0.0 <= anomaly_ratio <= 1.0:
        raise ValueError(f"anomaly_ratio must be in [0, 1], got {anomaly_ratio!r}.")
    if kind not in ("texture", "object"):
        raise ValueError(f"kind must be 'texture' or 'object', got {kind!r}.")
    known = OBJECT_DEFECT_TYPES if kind == "object" else DEFECT_TYPES
    if defect_types is None:
        defect_types = known
    if isinstance(defect_types, str):
        defect_types = (defect_types,)
    defect_types = tuple(defect_types)
    unknown = [d for d in defect_types if d not in known]
    if not defect_types or unknown:
        raise ValueError(
            f"defect_types for kind={kind!r} must be a non-empty subset of {known}, "
            f"got {defect_types!r}."
        )
    return shape, defect_types


def make_defect_images(
    n_samples=100,
    image_size=(64, 64),
    anomaly_ratio=0.5,
    defect_types=None,
    random_state=None,
    kind="texture",
):
    """Generate surface or object images, some with localized defects.

    ``kind="texture"``: every image is a woven, grained, slowly shaded
    surface drawn from the same distribution (random phase and noise).
    Anomalous images get one or two defects: thin bright or dark
    *scratches*, elliptical bright or dark *spots*, or dark *holes* with a
    bright rim. Defect contrast is 1.5 to 3 times the texture's standard
    deviation.

    ``kind="object"``: every image shows one small screw (a threaded shaft
    and a slotted head) at a random position and rotation on a plain
    background, so that normal images differ by pose. Anomalous images get
    one small defect: a *notch* bitten out of the thread, a *bump* of extra
    material on the outline, or a bright *scratch* across the shaft.

    Only the pixels of the mask are changed.

    Parameters
    ----------
    n_samples : int, default=100
        Number of images.
    image_size : int or (height, width), default=(64, 64)
        Image size; at least 16 pixels per side.
    anomaly_ratio : float, default=0.5
        Fraction of anomalous images; ``round(anomaly_ratio * n_samples)``
        images get defects, at random positions in the output.
    defect_types : sequence of str, default=None
        Defect types to draw from, uniformly; ``None``: all of the kind's,
        ``("scratch", "spot", "hole")`` for textures and ``("notch",
        "scratch", "bump")`` for objects.
    random_state : int, RandomState instance or None, default=None
        Controls the whole generation. Pass an int for reproducible output.
    kind : {"texture", "object"}, default="texture"
        A textured surface, or an object at a random pose (see above). Pick
        ``"object"`` to try a setting on parts whose position and rotation
        vary between images.

    Returns
    -------
    X : ndarray of uint8, shape (n_samples, height, width, 3)
        RGB images.
    y : ndarray of int, shape (n_samples,)
        1 for anomalous images, 0 for normal ones.
    masks : ndarray of bool, shape (n_samples, height, width)
        True on defect pixels; all False for normal images.

    Examples
    --------
    >>> from skprotoad.datasets import make_defect_images
    >>> X, y, masks = make_defect_images(4, anomaly_ratio=0.5, random_state=0)
    >>> X.shape, X.dtype, int(y.sum()), masks.shape
    ((4, 64, 64, 3), dtype('uint8'), 2, (4, 64, 64))
    >>> X, y, masks = make_defect_images(4, image_size=96, kind="object", random_state=0)
    >>> X.shape, bool(masks[y == 1].any(axis=(1, 2)).all())
    ((4, 96, 96, 3), True)
    """
    shape, defect_types = _check_generator_params(
        n_samples, image_size, anomaly_ratio, defect_types, kind
    )
    random_state = check_random_state(random_state)
    n_anomalous = int(round(anomaly_ratio * n_samples))
    y = np.zeros(n_samples, dtype=int)
    y[random_state.permutation(n_samples)[:n_anomalous]] = 1
    # One seed per image keeps each image independent of the others' draws.
    seeds = random_state.randint(0, 2**31 - 1, size=n_samples)
    X = np.empty((n_samples,) + shape + (3,), dtype=np.uint8)
    masks = np.zeros((n_samples,) + shape, dtype=bool)
    for i in range(n_samples):
        rng = np.random.default_rng(seeds[i])
        if kind == "object":
            image, masks[i] = _make_object_sample(rng, shape, defect_types, bool(y[i]))
        else:
            _, image, masks[i] = _make_sample(rng, shape, defect_types, bool(y[i]))
        X[i] = _to_rgb(image)
    return X, y, masks


def make_defect_dataset(
    n_train=50,
    n_test=40,
    image_size=(64, 64),
    anomaly_ratio=0.5,
    defect_types=None,
    random_state=None,
    kind="texture",
):
    """Generate a train set of normal images and a labelled test set.

    Parameters
    ----------
    n_train : int, default=50
        Number of (normal) training images.
    n_test : int, default=40
        Number of test images.
    image_size : int or (height, width), default=(64, 64)
        Image size.
    anomaly_ratio : float, default=0.5
        Fraction of anomalous test images.
    defect_types : sequence of str, default=None
        Defect types to draw from; ``None``: all of the kind's.
    random_state : int, RandomState instance or None, default=None
        Controls the whole generation.
    kind : {"texture", "object"}, default="texture"
        Textured surfaces or objects at random poses: see
        :func:`make_defect_images`.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        With fields ``X_train`` (uint8, (n_train, h, w, 3), all normal),
        ``X_test`` (uint8, (n_test, h, w, 3)), ``y_test`` (int, 1
        anomalous) and ``masks_test`` (bool, (n_test, h, w)).

    Examples
    --------
    >>> from skprotoad.datasets import make_defect_dataset
    >>> data = make_defect_dataset(n_train=8, n_test=6, random_state=0)
    >>> data.X_train.shape, data.X_test.shape, int(data.y_test.sum())
    ((8, 64, 64, 3), (6, 64, 64, 3), 3)
    """
    random_state = check_random_state(random_state)
    X_train, _, _ = make_defect_images(
        n_train, image_size, 0.0, defect_types, random_state=random_state, kind=kind
    )
    X_test, y_test, masks_test = make_defect_images(
        n_test, image_size, anomaly_ratio, defect_types, random_state=random_state, kind=kind
    )
    return Bunch(X_train=X_train, X_test=X_test, y_test=y_test, masks_test=masks_test)
