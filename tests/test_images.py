import numpy as np
import pytest
import torch
from PIL import Image

from skprotoad._images import ImageSequence, center_crop_box, load_image, resize_and_crop


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def test_all_input_forms_give_the_same_tensor(rgb, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for item in (rgb, rgb.astype(np.float32) / 255, Image.fromarray(rgb), str(path), path):
        loaded = resize_and_crop(load_image(item), (20, 30), None)
        assert torch.allclose(loaded, expected, atol=1e-6), type(item)


def test_grey_forms_are_replicated_to_three_channels(rgb):
    grey = rgb[..., 0]
    forms = (grey, grey[..., None], np.repeat(grey[..., None], 3, axis=2), Image.fromarray(grey))
    a, *others = (resize_and_crop(load_image(f), (16, 24), 12) for f in forms)
    assert a.shape == (3, 12, 12)
    for other in others:
        torch.testing.assert_close(a, other)


def test_resize_matches_torch_antialiased_bilinear(rgb):
    import torch.nn.functional as F

    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for size in ((11, 13), (40, 64)):  # down and up
        ours = resize_and_crop(load_image(rgb), size, None)
        ref = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        torch.testing.assert_close(ours, ref.clamp(0, 1), atol=1e-5, rtol=0)


def test_sequence_of_mixed_sizes_batches_to_the_crop(rgb):
    images = ImageSequence([rgb, rgb[:10], np.zeros((50, 7), np.uint8)])
    (index, batch), = list(images.batches(4, image_size=32, crop_size=24))
    assert index == [0, 1, 2]
    assert batch.shape == (3, 3, 24, 24)
    assert images.original_size(1) == (10, 30)


def test_batches_follow_the_given_order(rgb):
    X = np.stack([rgb, rgb // 2, rgb // 3])
    images = ImageSequence(X)
    chunks = list(images.batches(2, 20, None, indices=[2, 0, 1]))
    assert [c for c, _ in chunks] == [[2, 0], [1]]
    torch.testing.assert_close(chunks[0][1][0], resize_and_crop(load_image(X[2]), 20, None))


def test_unreadable_file_raises_when_its_batch_is_asked_for(rgb, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    batches = ImageSequence([good, good, bad]).batches(2, (20, 30), None)
    chunk, _ = next(batches)  # images are read batch by batch
    assert chunk == [0, 1]
    with pytest.raises(ValueError, match=r"X\[2\].*bad\.png"):
        next(batches)


def test_center_crop_box_geometry():
    assert center_crop_box(256, 224) == (16, 16, 224, 224)
    assert center_crop_box((100, 300), (50, 101)) == (25, 99, 50, 101)
    assert center_crop_box(64, None) == (0, 0, 64, 64)
    with pytest.raises(ValueError, match="larger than image_size"):
        center_crop_box(200, 224)


def test_resize_and_crop_keeps_a_feature_in_place():
    img = np.zeros((100, 200, 3), np.float32)
    img[40:60, 90:110] = 1.0  # a square at the centre of a wide image
    out = resize_and_crop(img, 64, 48)
    ys, xs = np.nonzero(out[0].numpy() > 0.5)
    assert abs(ys.mean() - 23.5) < 1 and abs(xs.mean() - 23.5) < 1


@pytest.mark.parametrize(
    "X, error, match",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
        ([], ValueError, "empty"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, "channel-first"),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError, "RGBA"),
        (np.zeros((2, 8), np.uint8), ValueError, "expected"),
        (np.full((1, 8, 8), 2.0), ValueError, r"\[0, 1\]"),
        (np.full((1, 8, 8), np.nan), ValueError, "NaN"),
        (np.zeros((1, 8, 8), np.int16), TypeError, "dtype int16"),
        (np.zeros((1, 8, 8), bool), TypeError, "dtype bool"),
        ("some/folder", TypeError, "single path"),
        (3, TypeError, "got int"),
        ([np.zeros((8, 8)), 5], TypeError, r"X\[1\]"),
        ([np.zeros((8, 8, 2))], ValueError, r"X\[0\]"),
        # one image where a batch is expected
        (np.zeros((64, 48, 3), np.uint8), ValueError, r"one RGB image .*X\[None\]"),
        (np.zeros((64, 48, 1), np.uint8), ValueError, "one grey image"),
        (np.zeros((64, 48), np.uint8), ValueError, r"one grey image, pass X\[None\]"),
        # arrays of paths other than 1-D, mappings
        (np.array([["a.png"], ["b.png"]]), TypeError, "2-D array of dtype <U5.*paths"),
        (np.zeros((1, 8, 8), object), TypeError, "dtype object.*uint8 or float"),
        ({"a": np.zeros((8, 8))}, TypeError, "got a dict"),
        # values and dtypes
        (np.full((1, 8, 8), np.inf, np.float32), ValueError, "NaN or infinite"),
        (np.full((1, 8, 8), -0.5), ValueError, r"\[0, 1\]"),
        (np.zeros((1, 8, 8), np.uint16), TypeError, "dtype uint16"),
        # the same checks on the items of a list
        ([np.zeros((3, 8, 8), np.uint8)], ValueError, r"X\[0\].*channel-first"),
        ([np.zeros((8, 8, 4), np.uint8)], ValueError, r"X\[0\].*RGBA"),
        ([np.full((8, 8), 255.0)], ValueError, r"X\[0\].*\[0, 1\]"),
        ([np.zeros((8, 8), np.uint16)], TypeError, r"X\[0\].*uint16"),
    ],
)
def test_bad_input_is_named(X, error, match):
    with pytest.raises(error, match=match):
        ImageSequence(X)


def test_file_problems_are_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image(bad)
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(deep)
    with pytest.raises(ValueError, match="16-bit"):
        load_image(deep)


def _png_header_only(path, width, height):
    import struct
    import zlib

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _palette_with_transparency(path):
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4).convert("P")
    img.info["transparency"] = 0
    img.save(path, transparency=0)


_BAD_FILES = [
    ("huge.png", lambda p: _png_header_only(p, 20000, 20000), "too large to decode safely"),
    ("rgba.png", lambda p: Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(p),
     "RGBA image with transparent pixels"),
    ("la.png", lambda p: Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA").save(p),
     "LA image with transparent pixels"),
    ("palette.png", _palette_with_transparency, "transparent pixels"),
    ("float.tiff", lambda p: Image.fromarray(np.zeros((8, 8), np.float32)).save(p),
     "16-bit or float"),
    ("text.png", lambda p: p.write_text("hello"), "cannot identify image"),
    ("notes.txt", lambda p: p.write_text("hello"), "cannot identify image"),
]


@pytest.mark.parametrize("name, make, match", _BAD_FILES, ids=[b[0] for b in _BAD_FILES])
def test_bad_files_are_named(tmp_path, name, make, match):
    path = tmp_path / name
    make(path)
    with pytest.raises(ValueError, match=match):
        load_image(path)
    with pytest.raises(ValueError, match=name):
        ImageSequence([path]).load(0)
    if name == "huge.png":  # refused from the header, before any decoding
        with pytest.raises(ValueError, match="too large"):
            ImageSequence([path]).original_size(0)


def test_opaque_alpha_is_dropped(tmp_path, rgb):
    path = tmp_path / "opaque.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(path)
    np.testing.assert_array_equal(load_image(path), load_image(rgb))


def test_truncated_file_is_named(tmp_path, rgb):
    path = tmp_path / "cut.jpg"
    Image.fromarray(rgb).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(path)


def test_lab_images_are_colour_not_transparency(tmp_path, rgb):
    """LAB's "A" band is a colour axis; it was taken for alpha."""
    from PIL import ImageCms

    to_lab = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    path = tmp_path / "lab.tif"
    ImageCms.applyTransform(Image.fromarray(rgb), to_lab).save(path)
    with Image.open(path) as img:
        assert img.mode == "LAB"
    loaded = load_image(path)
    assert loaded.shape == rgb.shape
    assert np.abs(loaded - rgb / 255.0).mean() < 0.05  # the same colours, up to conversion


def test_premultiplied_grey_alpha_is_read_or_named(rgb):
    grey = Image.fromarray(rgb[..., 0])
    opaque = Image.merge("La", [grey, Image.new("L", grey.size, 255)])
    np.testing.assert_array_equal(ImageSequence([opaque]).load(0), load_image(grey))
    clear = Image.merge("La", [grey, Image.new("L", grey.size, 0)])
    with pytest.raises(ValueError, match=r"X\[0\] is a La image with transparent pixels"):
        ImageSequence([clear]).load(0)


@pytest.mark.parametrize("fmt, orientation", [("JPEG", 6), ("JPEG", 3), ("PNG", 8), ("TIFF", 6)])
def test_exif_orientation_is_applied_everywhere(tiny_detector, tmp_path, fmt, orientation):
    """A file with an EXIF orientation is scored, sized and drawn as viewers show
    it: exactly like its pixels turned upright and saved without the tag."""
    from PIL import ImageOps

    from skprotoad.batch_scoring import score_and_write
    from skprotoad.plotting import as_rgb_uint8

    stored = np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = tmp_path / f"tagged.{fmt.lower()}"
    Image.fromarray(stored).save(tagged, fmt, exif=exif)
    with Image.open(tagged) as img:  # the decoded pixels, turned: no re-encoding
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    reference = tmp_path / "reference.png"
    Image.fromarray(shown).save(reference)
    size = shown.shape[:2]
    assert size == ((56, 40) if orientation == 6 or orientation == 8 else (40, 56))

    np.testing.assert_array_equal(load_image(tagged), load_image(reference))
    assert ImageSequence([tagged]).original_size(0) == size
    np.testing.assert_array_equal(as_rgb_uint8(tagged), as_rgb_uint8(reference))
    items = [str(tagged), str(reference)]
    result = score_and_write(tiny_detector, items, names=["t", "r"], out_dir=tmp_path / "out")
    assert result["size"] == [size, size]
    assert result["score"][0] == result["score"][1]
    overlays = [np.asarray(Image.open(tmp_path / "out" / o)) for o in result["overlay"]]
    assert overlays[0].shape[:2] == (size[0] * 7, size[1] * 7)  # enlarged to a 256 px side
    np.testing.assert_array_equal(*overlays)


def test_1d_arrays_of_paths_or_images_are_their_list(tiny_detector, synthetic, tmp_path):
    """np.array(paths), a DataFrame column's values and a ragged object array of
    images are the lists they hold (they were refused for their shape)."""
    images = [synthetic.X_test[0], synthetic.X_test[1][:48]]  # two sizes
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    ragged = np.empty(2, dtype=object)
    ragged[:] = images
    expected = tiny_detector.score_samples(paths)
    for X in (np.array(paths), np.array(paths, dtype=object), ragged):
        np.testing.assert_array_equal(tiny_detector.score_samples(X), expected)


def test_skip_reasons_name_the_file_once_without_a_chunk_index(tiny_detector, rgb, tmp_path):
    """A chunk that fails is retried image by image; the reasons named each
    image by its index in that retry (always X[0]) as well as by its path."""
    from skprotoad.batch_scoring import score_and_write

    good = tmp_path / "good.png"
    Image.fromarray(rgb).save(good)
    clear = tmp_path / "clear.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(clear)
    missing = tmp_path / "missing.png"
    result = score_and_write(tiny_detector, [str(good), str(clear), str(missing)])
    assert list(result["index"]) == [0]
    reasons = dict(result["skipped"])
    assert reasons[1].startswith(f"{clear} is a RGBA image with transparent pixels")
    assert reasons[2] == f"image file not found: {missing}"
