import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skprotoad._images import center_crop_box
from skprotoad.datasets import (
    _make_object_sample,
    _make_sample,
    load_btad,
    load_folder,
    load_input_masks,
    load_masks,
    load_mvtec,
    make_defect_dataset,
    make_defect_images,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKPROTOAD_DATA", REPO.parent / "shared" / "data"))
MAGNETIC_TILE = DATA / "magnetic_tile"


def _write(path, size=(8, 6), value=0, mode="L"):
    """Write a tiny image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _mvtec_tree(root, ext=".png"):
    """A category with 3 train, 2 good and 2 + 1 defect test images."""
    for name in ["002", "000", "001"]:
        _write(root / "train" / "good" / f"{name}{ext}")
    for name in ["001", "000"]:
        _write(root / "test" / "good" / f"{name}{ext}")
    for defect, names in {"crack": ["001", "000"], "blowhole": ["000"]}.items():
        for name in names:
            _write(root / "test" / defect / f"{name}{ext}")
            _write(root / "ground_truth" / defect / f"{name}_mask.png", value=255)
    (root / "README.md").write_text("not an image")
    (root / "train" / "good" / "notes.txt").write_text("ignored")
    return root


# --------------------------------------------------------------------------
# load_mvtec
# --------------------------------------------------------------------------


def test_load_mvtec_category_folder(tmp_path):
    root = _mvtec_tree(tmp_path / "tile")
    data = load_mvtec(root)
    assert [Path(p).name for p in data.train_paths] == ["000.png", "001.png", "002.png"]
    assert data.test_defect_types == ["blowhole", "crack", "crack", "good", "good"]
    assert data.test_labels.tolist() == [1, 1, 1, 0, 0]
    assert data.test_labels.dtype.kind == "i"
    names = [Path(p).relative_to(root).as_posix() for p in data.test_paths]
    assert names == [
        "test/blowhole/000.png",
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/good/001.png",
    ]
    masks = [None if m is None else Path(m).relative_to(root).as_posix() for m in data.test_mask_paths]
    assert masks == [
        "ground_truth/blowhole/000_mask.png",
        "ground_truth/crack/000_mask.png",
        "ground_truth/crack/001_mask.png",
        None,
        None,
    ]
    assert data.category is None and data.root == str(root)
    assert all(isinstance(p, str) for p in data.train_paths + data.test_paths)


def test_load_mvtec_with_category_and_mixed_extensions(tmp_path):
    root = tmp_path / "mvtec"
    _mvtec_tree(root / "tile", ext=".JPG")
    _mvtec_tree(root / "wood", ext=".bmp")
    # a mask named like its image, with another extension
    cat = root / "wood"
    (cat / "ground_truth" / "blowhole" / "000_mask.png").unlink()
    _write(cat / "ground_truth" / "blowhole" / "000.tif")
    data = load_mvtec(root, "wood")
    assert data.category == "wood"
    assert data.test_mask_paths[0].endswith(os.path.join("blowhole", "000.tif"))
    assert load_mvtec(str(root), "tile").train_paths[0].endswith("000.JPG")


def test_load_mvtec_is_deterministic(tmp_path):
    root = _mvtec_tree(tmp_path / "tile")
    a, b = load_mvtec(root), load_mvtec(root)
    assert a.test_paths == b.test_paths and a.train_paths == b.train_paths


def test_load_mvtec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mvtec(tmp_path / "nope")
    root = tmp_path / "mvtec"
    _mvtec_tree(root / "tile")
    _mvtec_tree(root / "wood")
    with pytest.raises(FileNotFoundError, match=r"'carpet'.*\['tile', 'wood'\]"):
        load_mvtec(root, "carpet")
    with pytest.raises(ValueError, match="pass its category"):
        load_mvtec(root)
    (root / "wood" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"001\.png"):
        load_mvtec(root, "wood")
    for p in (root / "tile" / "train" / "good").iterdir():
        if p.suffix == ".png":
            p.unlink()
    with pytest.raises(ValueError, match="no training images"):
        load_mvtec(root, "tile")


def test_load_mvtec_missing_test_folder(tmp_path):
    _write(tmp_path / "train" / "good" / "a.png")
    with pytest.raises(ValueError, match="'test'"):
        load_mvtec(tmp_path)


# --------------------------------------------------------------------------
# load_btad
# --------------------------------------------------------------------------


def _btad_tree(root):
    cat = root / "01"
    for name in ["0001", "0000"]:
        _write(cat / "train" / "ok" / f"{name}.bmp")
    _write(cat / "test" / "ok" / "0005.bmp")
    for name in ["0003", "0004"]:
        _write(cat / "test" / "ko" / f"{name}.bmp")
        _write(cat / "ground_truth" / "ko" / f"{name}.png", value=255)
    return root


def test_load_btad(tmp_path):
    root = _btad_tree(tmp_path / "BTAD")
    data = load_btad(root, "01")
    assert [Path(p).name for p in data.train_paths] == ["0000.bmp", "0001.bmp"]
    assert data.test_defect_types == ["ko", "ko", "ok"]
    assert data.test_labels.tolist() == [1, 1, 0]
    assert [None if m is None else Path(m).name for m in data.test_mask_paths] == [
        "0003.png",
        "0004.png",
        None,
    ]
    assert data.category == "01"
    assert load_btad(root / "01").test_paths == data.test_paths


def test_load_btad_errors(tmp_path):
    root = _btad_tree(tmp_path / "BTAD")
    with pytest.raises(FileNotFoundError, match=r"\['01'\]"):
        load_btad(root, "02")
    (root / "01" / "ground_truth" / "ko" / "0004.png").unlink()
    with pytest.raises(FileNotFoundError, match="0004"):
        load_btad(root, "01")
    with pytest.raises(ValueError, match="train/ok"):
        load_btad(_mvtec_tree(tmp_path / "tile"))


# --------------------------------------------------------------------------
# load_folder
# --------------------------------------------------------------------------


def test_load_folder(tmp_path):
    for name in ["b.png", "a.jpeg"]:
        _write(tmp_path / "ok" / name)
    for name in ["y.png", "x.PNG"]:
        _write(tmp_path / "bad" / name)
    _write(tmp_path / "gt" / "x_mask.png")
    _write(tmp_path / "gt" / "y.bmp")
    data = load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "gt")
    assert [Path(p).name for p in data.paths] == ["a.jpeg", "b.png", "x.PNG", "y.png"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert [None if m is None else Path(m).name for m in data.mask_paths] == [
        None,
        None,
        "x_mask.png",
        "y.bmp",
    ]
    only_normal = load_folder(tmp_path / "ok")
    assert only_normal.labels.tolist() == [0, 0] and only_normal.mask_paths == [None, None]
    no_masks = load_folder(tmp_path / "ok", tmp_path / "bad")
    assert no_masks.mask_paths == [None] * 4


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_folder(tmp_path / "empty")
    _write(tmp_path / "ok" / "a.png")
    _write(tmp_path / "bad" / "z.png")
    (tmp_path / "gt").mkdir()
    with pytest.raises(FileNotFoundError, match="z.png"):
        load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "gt")
    with pytest.raises(ValueError, match="without abnormal_dir"):
        load_folder(tmp_path / "ok", mask_dir=tmp_path / "gt")


# --------------------------------------------------------------------------
# Mask geometry
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, crop_size, expected",
    [
        (256, 224, (16, 16, 224, 224)),
        (255, 224, (15, 15, 224, 224)),
        (224, 224, (0, 0, 224, 224)),
        ((300, 256), (224, 200), (38, 28, 224, 200)),
        ((256, 256), 225, (15, 15, 225, 225)),
    ],
)
def test_center_crop_box(image_size, crop_size, expected):
    assert center_crop_box(image_size, crop_size) == expected


@pytest.mark.parametrize(
    "image_size, crop_size", [(224, 256), ((100, 300), (120, 100)), (0, 0), ((1, 2, 3), 1), (8.0, 4)]
)
def test_center_crop_box_errors(image_size, crop_size):
    with pytest.raises((ValueError, TypeError)):
        center_crop_box(image_size, crop_size)


def _rect_mask(tmp_path):
    """100 x 200 (h x w) mask; rectangle rows [0, 50), cols [100, 200)."""
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[:50, 100:] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    return path


def test_load_masks_geometry_square(tmp_path):
    # Resize to 64 x 64: scale 1.5625 on rows, 3.125 on columns; nearest
    # takes source pixel floor((i + 0.5) * scale). Rows 0..31 and columns
    # 32..63 are inside. The crop of 48 starts at 8 on both axes.
    masks = load_masks([_rect_mask(tmp_path), None], image_size=64, crop_size=48)
    expected = np.zeros((48, 48), dtype=bool)
    expected[:24, 24:] = True
    assert masks.shape == (2, 48, 48) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], expected)
    assert not masks[1].any()


def test_load_masks_geometry_rectangular(tmp_path):
    # Resize to 32 x 64 (h x w): rows 0..15 and columns 32..63 are inside;
    # the (24, 48) crop starts at row 4, column 8.
    masks = load_masks([_rect_mask(tmp_path)], image_size=(32, 64), crop_size=(24, 48))
    expected = np.zeros((24, 48), dtype=bool)
    expected[:12, 24:] = True
    np.testing.assert_array_equal(masks[0], expected)


def test_load_masks_threshold_and_mode(tmp_path):
    arr = np.array([[0, 127], [128, 255]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([arr] * 3, axis=-1)).save(tmp_path / "rgb.png")
    for name in ["gray.png", "rgb.png"]:
        masks = load_masks([tmp_path / name], image_size=2, crop_size=2)
        np.testing.assert_array_equal(masks[0], [[False, False], [True, True]])
    assert load_masks([], image_size=4, crop_size=2).shape == (0, 2, 2)


def _square_mask(high=255, dtype=np.uint8):
    mask = np.zeros((8, 8), dtype=dtype)
    mask[2:6, 1:4] = high
    return mask


def test_masks_read_as_drawn_in_any_encoding(tmp_path):
    # 8-bit grey above 127 read 0/1, red, palette and float masks as empty
    expected = _square_mask(True, bool)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = _square_mask()
    palette = Image.fromarray(_square_mask(1)).convert("P")
    palette.putpalette([0, 0, 0, 0, 0, 128])  # index 1: navy
    rgba = np.dstack([_square_mask()] * 3 + [np.full((8, 8), 255, np.uint8)])
    encodings = {
        "grey.png": Image.fromarray(_square_mask()),
        "zero_one.png": Image.fromarray(_square_mask(1)),
        "sixteen_bit.png": Image.fromarray(_square_mask(65535, np.uint16)),
        "sixteen_bit_0_1.png": Image.fromarray(_square_mask(1, np.uint16)),
        "red.png": Image.fromarray(red),
        "palette.png": palette,
        "opaque_rgba.png": Image.fromarray(rgba),
        "float.tif": Image.fromarray(_square_mask(1.0, np.float32)),
        "bilevel.png": Image.fromarray(_square_mask(255)).convert("1"),
    }
    for name, image in encodings.items():
        image.save(tmp_path / name)
        mask = load_masks([tmp_path / name], image_size=(8, 8), crop_size=None)[0]
        np.testing.assert_array_equal(mask, expected, err_msg=name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    assert not load_masks([tmp_path / "empty.png"], image_size=(8, 8))[0].any()


def test_masks_are_turned_as_their_exif_orientation_says(tmp_path):
    stored = _square_mask()
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it a quarter clockwise
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    mask = load_input_masks([tmp_path / "turned.png"], [(8, 8)])[0]
    np.testing.assert_array_equal(mask, np.rot90(stored, -1) > 0)


def test_loader_checks_each_mask_before_any_fit(tmp_path):
    root = _mvtec_tree(tmp_path / "tile")  # 8 x 6 images
    mask = root / "ground_truth" / "crack" / "001_mask.png"
    _write(mask, size=(6, 8), value=255)  # transposed: another picture's
    with pytest.raises(ValueError, match="001_mask.png.*not the same picture"):
        load_mvtec(root)
    _write(mask, size=(16, 12), value=255)  # twice the resolution: resized
    load_mvtec(root)
    mask.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image.*001_mask.png"):
        load_mvtec(root)
    _write(mask, value=255)
    _write(root / "test" / "crack" / "001.jpg")  # the same stem: one mask for two
    with pytest.raises(ValueError, match="share a file name stem"):
        load_mvtec(root)


def test_loaders_say_what_they_leave_out(tmp_path):
    root = _mvtec_tree(tmp_path / "tile")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the complete tree: nothing to say
        load_mvtec(root)
    _write(root / "train" / "good" / "batch2" / "010.png")  # images a level down
    _write(root / "ground_truth" / "crack" / "007_mask.png", value=255)  # image renamed
    _write(root / "ground_truth" / "scratch" / "000_mask.png", value=255)  # no test folder
    with pytest.warns(UserWarning) as record:
        data = load_mvtec(root)
    messages = " | ".join(str(w.message) for w in record)
    assert "sub-folders of images that are not read" in messages and "batch2" in messages
    assert "1 mask(s)" in messages and "007_mask.png" in messages
    assert "'scratch'" in messages
    assert len(data.train_paths) == 3  # still read as before, only said

    _write(tmp_path / "ok" / "a.png")
    _write(tmp_path / "bad" / "z.png")
    _write(tmp_path / "bad" / "more" / "y.png")
    _write(tmp_path / "gt" / "z_mask.png", value=255)
    _write(tmp_path / "gt" / "w_mask.png", value=255)
    with pytest.warns(UserWarning) as record:
        load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "gt")
    messages = " | ".join(str(w.message) for w in record)
    assert "'more'" in messages and "w_mask.png" in messages


def test_load_folder_checks_masks_as_the_layouts_do(tmp_path):
    _write(tmp_path / "ok" / "a.png")
    _write(tmp_path / "bad" / "z.png")  # 8 x 6
    _write(tmp_path / "gt" / "z_mask.png", size=(6, 8), value=255)  # transposed
    with pytest.raises(ValueError, match="not the same picture"):
        load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "gt")
    _write(tmp_path / "gt" / "z_mask.png", value=255)
    _write(tmp_path / "bad" / "z.jpg")  # one mask for two images
    with pytest.raises(ValueError, match="share a file name stem"):
        load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "gt")


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------


def test_make_defect_images_shapes_and_determinism():
    X, y, masks = make_defect_images(20, image_size=(48, 40), anomaly_ratio=0.25, random_state=0)
    assert X.shape == (20, 48, 40, 3) and X.dtype == np.uint8
    assert y.shape == (20,) and y.sum() == 5 and set(np.unique(y)) <= {0, 1}
    assert masks.shape == (20, 48, 40) and masks.dtype == bool
    X2, y2, masks2 = make_defect_images(20, image_size=(48, 40), anomaly_ratio=0.25, random_state=0)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(masks, masks2)
    X3, _, _ = make_defect_images(20, image_size=(48, 40), anomaly_ratio=0.25, random_state=1)
    assert not np.array_equal(X, X3)


def test_make_defect_images_masks_match_labels():
    _, y, masks = make_defect_images(40, anomaly_ratio=0.5, random_state=3)
    has_defect = masks.any(axis=(1, 2))
    np.testing.assert_array_equal(has_defect, y.astype(bool))
    # defects are local: well under a quarter of the image
    assert masks[y == 1].mean(axis=(1, 2)).max() < 0.25


def test_normal_images_vary_but_share_statistics():
    X, _, _ = make_defect_images(30, anomaly_ratio=0.0, random_state=0)
    gray = X[..., 0].astype(float)
    assert not np.array_equal(X[0], X[1])
    means, stds = gray.mean(axis=(1, 2)), gray.std(axis=(1, 2))
    assert np.ptp(means) < 25 and np.ptp(stds) < 10
    assert 110 < means.mean() < 145 and 10 < stds.mean() < 30


@pytest.mark.parametrize("defect", ["scratch", "spot", "hole"])
def test_defects_change_pixels_only_inside_mask(defect):
    for seed in range(10):
        clean, image, mask = _make_sample(np.random.default_rng(seed), (64, 64), (defect,), True)
        changed = np.abs(image - clean) > 1e-9
        assert mask.any()
        assert not (changed & ~mask).any()
        # the mask marks changed pixels, with contrast comparable to the texture
        assert changed[mask].mean() > 0.95
        assert np.abs(image - clean)[mask].mean() > 20


@pytest.mark.parametrize("defect", ["notch", "scratch", "bump"])
def test_object_defects_change_pixels_only_inside_mask(defect):
    for seed in range(10):
        normal, _ = _make_object_sample(np.random.default_rng(seed), (96, 96), (defect,), False)
        image, mask = _make_object_sample(np.random.default_rng(seed), (96, 96), (defect,), True)
        changed = np.abs(image - normal) > 1e-9
        assert mask.any() and not (changed & ~mask).any()
        # small next to the object, and visible: most masked pixels change by
        # more than the background's noise
        assert mask.sum() < 0.01 * mask.size
        assert np.mean(np.abs(image - normal)[mask] > 10) > 0.5


def test_objects_vary_in_pose_on_one_background():
    X, y, masks = make_defect_images(12, image_size=96, anomaly_ratio=0.0, kind="object",
                                     random_state=0)
    dark = X[..., 0] < 150  # the object, on a light background
    centres = np.array([np.argwhere(d).mean(axis=0) for d in dark])
    assert np.ptp(centres, axis=0).min() > 10  # positions differ
    # each object covers a few percent of its image, the same amount in every pose
    share = dark.mean(axis=(1, 2))
    assert 0.01 < share.min() and share.max() < 0.1 and np.ptp(share) < 0.02
    assert not masks.any()


def test_normal_samples_are_untouched():
    clean, image, mask = _make_sample(np.random.default_rng(0), (32, 32), ("spot",), False)
    np.testing.assert_array_equal(clean, image)
    assert not mask.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_samples": -1}, "n_samples"),
        ({"image_size": 8}, "at least 16"),
        ({"anomaly_ratio": 1.5}, "anomaly_ratio"),
        ({"defect_types": ("crack",)}, "defect_types"),
        ({"defect_types": ()}, "defect_types"),
        ({"defect_types": ("notch",)}, "defect_types"),
        ({"kind": "object", "defect_types": ("spot",)}, "defect_types"),
        ({"kind": "plastic"}, "kind"),
    ],
)
def test_make_defect_images_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_defect_images(**kwargs)


def test_make_defect_dataset():
    data = make_defect_dataset(n_train=6, n_test=8, image_size=32, anomaly_ratio=0.5, random_state=0)
    assert data.X_train.shape == (6, 32, 32, 3) and data.X_test.shape == (8, 32, 32, 3)
    assert data.y_test.sum() == 4 and data.masks_test.shape == (8, 32, 32)
    again = make_defect_dataset(n_train=6, n_test=8, image_size=32, random_state=0)
    np.testing.assert_array_equal(data.X_test, again.X_test)
    # train and test images are different draws
    assert not any(np.array_equal(a, b) for a in data.X_train for b in data.X_test)


# --------------------------------------------------------------------------
# Real data (skipped when absent)
# --------------------------------------------------------------------------


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"{MAGNETIC_TILE} not available")
def test_load_mvtec_magnetic_tile():
    data = load_mvtec(MAGNETIC_TILE)
    assert len(data.train_paths) == 761
    counts = {t: data.test_defect_types.count(t) for t in set(data.test_defect_types)}
    assert counts == {"good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    assert data.test_labels.sum() == 392
    assert all((m is None) == (label == 0) for m, label in zip(data.test_mask_paths, data.test_labels))
    for i in np.flatnonzero(data.test_labels):  # only headers are read
        with Image.open(data.test_paths[i]) as image, Image.open(data.test_mask_paths[i]) as mask:
            assert image.size == mask.size
    # Despite the README, most masks have a few grey edge pixels, hence the
    # > 127 threshold in load_masks.
    for i in np.flatnonzero(data.test_labels)[::97]:
        with Image.open(data.test_mask_paths[i]) as mask:
            values = np.asarray(mask.convert("L"))
        assert np.mean((values > 0) & (values < 255)) < 0.05
    masks = load_masks(data.test_mask_paths[:5], image_size=256, crop_size=224)
    assert masks.shape == (5, 224, 224) and masks.any(axis=(1, 2)).all()
