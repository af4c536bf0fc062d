import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from skprotoad.plotting import (
    COLORMAPS,
    apply_colormap,
    PREDICTION_COLOR,
    TRUTH_COLOR,
    add_legend,
    contour,
    draw_contour,
    grid,
    overlay,
    save_png,
)


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)


def _peak_map(shape, where):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rows - where[0]) ** 2 + (cols - where[1]) ** 2) / 20.0).astype(np.float32)


@pytest.mark.parametrize("name", sorted(COLORMAPS))
def test_colormaps_are_256_uint8_entries(name):
    table = COLORMAPS[name]
    assert table.shape == (256, 3) and table.dtype == np.uint8


def test_inferno_gets_brighter_from_low_to_high():
    luminance = COLORMAPS["inferno"].astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) >= -1.0)  # rounding only
    assert luminance[0] < 10 and luminance[-1] > 230


def test_overlay_shape_and_dtype(image):
    out = overlay(image, _peak_map(image.shape[:2], (10, 20)))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_overlay_accepts_grey_float_pil_and_path(image, tmp_path):
    heat = _peak_map(image.shape[:2], (10, 20))
    grey = image[..., 0]
    expected = overlay(np.repeat(grey[..., None], 3, axis=2), heat, vmin=0, vmax=1)
    Image.fromarray(grey).save(tmp_path / "g.png")
    for form in (grey, grey[..., None], grey / 255.0, Image.fromarray(grey), tmp_path / "g.png"):
        np.testing.assert_array_equal(overlay(form, heat, vmin=0, vmax=1), expected)


def test_peak_gets_the_hot_colour_at_the_right_place(image):
    heat = _peak_map(image.shape[:2], (7, 33))
    out = overlay(image, heat, alpha=1.0, vmin=0.0, vmax=1.0)
    hot = COLORMAPS["inferno"][-1]
    np.testing.assert_array_equal(out[7, 33], hot)
    # Far from the peak the colour is the cold end.
    np.testing.assert_array_equal(out[29, 0], COLORMAPS["inferno"][0])
    # Half blending lands half way between the image and the hot colour.
    half = overlay(image, heat, alpha=0.5, vmin=0.0, vmax=1.0)
    expected = np.round(0.5 * image[7, 33].astype(float) + 0.5 * hot).astype(np.uint8)
    np.testing.assert_array_equal(half[7, 33], expected)


def test_fixed_range_makes_colours_comparable(image):
    heat = _peak_map(image.shape[:2], (10, 10))
    weak = 0.2 * heat
    # Stretched to its own range, a weak map looks as hot as a strong one...
    np.testing.assert_array_equal(overlay(image, weak), overlay(image, heat))
    # ...a fixed range shows it as it is.
    assert not np.array_equal(
        overlay(image, weak, vmin=0, vmax=1), overlay(image, heat, vmin=0, vmax=1)
    )
    # Values past vmax saturate.
    np.testing.assert_array_equal(
        overlay(image, 5 * heat, alpha=1, vmin=0, vmax=1)[10, 10], COLORMAPS["inferno"][-1]
    )


def test_nan_region_is_the_original_image(image):
    heat = _peak_map(image.shape[:2], (15, 22))
    heat[:, :8] = np.nan
    heat[:, -8:] = np.nan
    out = overlay(image, heat, alpha=0.7)
    np.testing.assert_array_equal(out[:, :8], image[:, :8])
    np.testing.assert_array_equal(out[:, -8:], image[:, -8:])
    assert not np.array_equal(out[:, 8:-8], image[:, 8:-8])


def test_all_nan_map_is_the_image(image):
    heat = np.full(image.shape[:2], np.nan)
    np.testing.assert_array_equal(overlay(image, heat), image)


def test_contour_pixels_are_exactly_the_outline_around_the_mask(image):
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[5:20, 10:30] = True
    mask[12:15, 15:20] = False  # a hole has an outline too
    mask[0:4, 40:45] = True  # touching the image border
    mask[25, 35] = True  # a one-pixel defect
    heat = np.zeros(image.shape[:2])
    color = (1, 2, 3)
    out = overlay(image, heat, alpha=0.0, mask=mask, contour_color=color)
    on_edge = mask.copy()
    on_edge[1:-1, 1:-1] = False
    expected = (ndimage.binary_dilation(mask) & ~mask) | on_edge
    painted = np.all(out == color, axis=-1) & ~np.all(image == color, axis=-1)
    np.testing.assert_array_equal(painted, expected)
    np.testing.assert_array_equal(out[~expected], image[~expected])
    # outside the rectangle, 1 pixel wide; the defect's own pixels stay visible
    assert contour(mask)[4, 10:30].all() and not (contour(mask) & mask)[1:-1, 1:-1].any()
    assert not contour(mask)[25, 35] and contour(mask)[[24, 26, 25, 25], [35, 35, 34, 36]].all()
    # at the image's edge the defect is closed in by its own edge pixels
    assert contour(mask)[0, 40:45].all() and contour(mask)[4, 40:45].all()


def test_legend_names_each_outline_colour(image):
    out = add_legend(image, [("predicted defect", PREDICTION_COLOR),
                             ("ground truth", TRUTH_COLOR)])
    h = image.shape[0]
    np.testing.assert_array_equal(out[:h], image)
    strip = out[h:]
    assert strip.shape[0] >= 2 * 10 and strip.shape[1] == image.shape[1]
    for color in (PREDICTION_COLOR, TRUTH_COLOR):
        rows = np.flatnonzero(np.all(strip == color, axis=-1).any(axis=1))
        assert len(rows) >= 8  # a swatch, not a stray pixel
    # the text is drawn: dark pixels right of the swatches
    assert (strip[:, 18:].min(axis=-1) < 100).sum() > 20
    assert PREDICTION_COLOR != TRUTH_COLOR


@pytest.mark.parametrize("value, mode", [(255, "L"), (1, "L"), (65535, "I;16"), (200, "RGB")])
def test_draw_contour_accepts_mask_files(value, mode, image, tmp_path):
    """Mask files are read as the evaluation reads them: a 0/1 or a red mask
    drew no outline (grey above 127)."""
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[3:9, 3:9] = True
    if mode == "RGB":  # red on black
        picture = Image.fromarray(np.stack([mask * value, 0 * mask, 0 * mask], -1).astype(np.uint8))
    elif mode == "I;16":
        picture = Image.fromarray((mask * value).astype(np.uint16))
    else:
        picture = Image.fromarray((mask * value).astype(np.uint8))
    picture.save(tmp_path / "m.png")
    expected = draw_contour(image, mask)
    assert (expected != image).any()
    np.testing.assert_array_equal(draw_contour(image, tmp_path / "m.png"), expected)
    with Image.open(tmp_path / "m.png") as opened:
        np.testing.assert_array_equal(draw_contour(image, opened), expected)


def test_overlay_rejects_mismatched_shapes(image):
    with pytest.raises(ValueError, match="output='input'"):
        overlay(image, np.zeros((10, 10)))
    with pytest.raises(ValueError, match="mask"):
        overlay(image, np.zeros(image.shape[:2]), mask=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="vmin"):
        overlay(image, np.zeros(image.shape[:2]), vmin=2, vmax=1)
    with pytest.raises(ValueError, match="colormap"):
        overlay(image, np.zeros(image.shape[:2]), colormap="nope")


def test_apply_colormap_flat_map_and_custom_table():
    np.testing.assert_array_equal(apply_colormap(np.ones((2, 2)), colormap="gray"), 255)
    table = np.array([[0, 0, 0], [10, 20, 30]], dtype=np.uint8)
    out = apply_colormap([[0.0, 1.0]], colormap=table)
    assert out[0, 1].tolist() == [10, 20, 30]


def test_save_png_round_trip(tmp_path, image):
    path = save_png(image, tmp_path / "sub" / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 2] = True
    saved = np.asarray(Image.open(save_png(mask, tmp_path / "m.png")))
    assert saved.shape == (4, 6) and set(np.unique(saved)) == {0, 255} and saved[1, 2] == 255


@pytest.mark.parametrize("n, ncols, rows, cols", [(1, 4, 1, 1), (5, 2, 3, 2), (4, 4, 1, 4)])
def test_grid_tiling_size(n, ncols, rows, cols):
    tiles = [np.full((20, 30, 3), 40 * i, dtype=np.uint8) for i in range(n)]
    out = grid(tiles, ncols=ncols, pad=2)
    assert out.shape == (rows * 20 + (rows + 1) * 2, cols * 30 + (cols + 1) * 2, 3)
    # Tiles sit where the formula says.
    np.testing.assert_array_equal(out[2:22, 2:32], tiles[0])


def test_grid_titles_add_a_strip_and_text():
    tiles = [np.zeros((20, 30, 3), dtype=np.uint8)] * 3
    plain = grid(tiles, ncols=3, pad=2)
    titled = grid(tiles, titles=["a", "bb", "a much too long title for the tile"], ncols=3, pad=2)
    strip = titled.shape[0] - plain.shape[0]
    assert strip > 5 and titled.shape[1] == plain.shape[1]
    # Some dark text pixels are in the strip, above the first tile.
    assert (titled[2 : 2 + strip, 2:32] < 128).any()


def test_grid_scales_images_of_different_sizes_into_tiles():
    tiles = [np.zeros((10, 40, 3), np.uint8), np.zeros((40, 10), np.uint8)]
    out = grid(tiles, ncols=2, tile_size=32, pad=0)
    assert out.shape == (32, 64, 3)
    # The wide image is letterboxed: background above and below it.
    assert (out[0, :32] == 255).all() and (out[16, :32] == 0).all()


def test_grid_rejects_bad_titles():
    with pytest.raises(ValueError, match="titles"):
        grid([np.zeros((4, 4))], titles=["a", "b"])


@pytest.mark.parametrize("size, expected", [
    ((40, 56), (280, 392)),  # enlarged 7 times to a 256 px shorter side
    ((300, 400), (300, 400)),  # large enough already
    ((1, 300), (118, 35400)),  # 256 times is over the 2048^2 cap: the most within it
    ((100, 5000), (200, 10000)),  # 3 times is over the cap, twice is not
    ((1, 2048 * 2048), (1, 2048 * 2048)),  # at the cap: as it is
])
def test_overlays_are_enlarged_as_far_as_the_pixel_cap_allows(size, expected):
    from skprotoad.batch_scoring import MAX_OUTPUT_PIXELS, _overlay_size

    assert _overlay_size(size) == expected
    assert expected[0] * expected[1] <= max(MAX_OUTPUT_PIXELS, size[0] * size[1])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tile_size=-5), ValueError, "tile_size must be at least 1, got -5"),
    # 0 tiled each image as one pixel
    (dict(tile_size=0), ValueError, "tile_size must be at least 1, got 0"),
    (dict(tile_size=(10, 0)), ValueError, "tile_size must be at least 1, got 0"),
    (dict(tile_size=(10, 10, 3)), ValueError, r"tile_size must be an int or \(height, width\)"),
    (dict(tile_size=12.5), TypeError, "tile_size must be an int"),
    (dict(pad=-1), ValueError, "pad must be at least 0, got -1"),
    (dict(background=300), ValueError, r"background must be in \[0, 255\], got 300"),
    (dict(background=-1), ValueError, r"background must be in \[0, 255\], got -1"),
    (dict(ncols=0), ValueError, "ncols must be at least 1, got 0"),
    # 2.5 was tiled as 2 columns without a word
    (dict(ncols=2.5), TypeError, "ncols must be an int"),
])
def test_grid_refuses_bad_sizes_and_backgrounds(kwargs, error, match):
    with pytest.raises(error, match=match):
        grid([np.zeros((4, 4, 3), np.uint8)], **kwargs)


def test_legend_refuses_a_background_out_of_the_grey_levels(image):
    with pytest.raises(ValueError, match=r"background must be in \[0, 255\], got 256"):
        add_legend(image, [("predicted", PREDICTION_COLOR)], background=256)


def test_colormap_tables_in_matplotlibs_float_form_are_scaled():
    as_floats = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.2]])
    out = apply_colormap([[0.0, 1.0]], colormap=as_floats)
    assert out[0, 1].tolist() == [255, 128, 51]  # was cast to [1, 0, 0]: black
    as_ints = np.array([[0, 0, 0], [255, 128, 51]])
    np.testing.assert_array_equal(out, apply_colormap([[0.0, 1.0]], colormap=as_ints))


@pytest.mark.parametrize("table, error, match", [
    ([[0, 0, 0], [300, 0, 0]], ValueError, r"integer table must lie in 0\.\.255"),  # was 44
    ([[0, 0, 0], [-1, 0, 0]], ValueError, r"integer table must lie in 0\.\.255"),
    ([[0.0, 0.0, 0.0], [255.0, 0.0, 0.0]], ValueError, r"float table must lie in \[0, 1\]"),
    ([[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]], ValueError, r"float table must lie in \[0, 1\]"),
    ([["a", "b", "c"], ["d", "e", "f"]], TypeError, "integers in 0..255 or floats"),
    (np.ones((4, 4)), ValueError, r"drop the alpha column"),
])
def test_colormap_tables_out_of_range_are_refused(table, error, match):
    with pytest.raises(error, match=match):
        apply_colormap([[0.0, 1.0]], colormap=table)


def test_16_bit_files_are_refused_as_16_bit_arrays_are(tmp_path):
    """A 16-bit file was drawn almost all white (clipped to 255)."""
    pixels = np.full((6, 8), 60000, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    heat = np.zeros(pixels.shape)
    with pytest.raises(TypeError, match="uint8 or float in"):
        overlay(pixels, heat)
    for form in (tmp_path / "deep.png", Image.open(tmp_path / "deep.png")):
        with pytest.raises(ValueError, match=r"16-bit or float\) image; convert it to 8-bit"):
            overlay(form, heat)
    with pytest.raises(ValueError, match=r"images\[1\] .*deep.png\) is a I;16"):
        grid([np.zeros((6, 8), np.uint8), tmp_path / "deep.png"])


@pytest.mark.parametrize("value, match", [
    (100.0, r"values in \[0.5, 100\]; float images must lie in \[0, 1\]"),  # was white
    (-0.5, r"values in \[-0.5, 0.5\]; float images must lie in \[0, 1\]"),
    (np.nan, "contains NaN or infinite values"),
])
def test_float_images_outside_0_1_are_refused(value, match, tmp_path):
    floats = np.full((6, 8), 0.5)
    floats[0, 0] = value
    with pytest.raises(ValueError, match=match):
        overlay(floats, np.zeros(floats.shape))
    with pytest.raises(ValueError, match=match):
        save_png(floats, tmp_path / "x.png")
    assert not any(tmp_path.iterdir())


def test_infinite_map_values_are_the_ends_of_the_colour_scale(image):
    """+inf is a score beyond vmax, not a pixel left unscored as NaN is."""
    heat = _peak_map(image.shape[:2], (15, 22))
    heat[3, 4], heat[5, 6], heat[7, 8] = np.inf, -np.inf, np.nan
    for vmin, vmax in ((0.0, 1.0), (None, None)):
        out = overlay(image, heat, alpha=1.0, vmin=vmin, vmax=vmax)
        np.testing.assert_array_equal(out[3, 4], COLORMAPS["inferno"][-1])
        np.testing.assert_array_equal(out[5, 6], COLORMAPS["inferno"][0])
        np.testing.assert_array_equal(out[7, 8], image[7, 8])
        # the finite values keep their colours: the range is theirs
        np.testing.assert_array_equal(out[15, 22], COLORMAPS["inferno"][-1])
