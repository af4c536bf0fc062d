"""Property-based checks: any array is either accepted as images or refused
with a ValueError/TypeError naming it, never a crash deeper down."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from skprotoad._images import ImageSequence, load_image, resize_and_crop

DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_]
)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(DTYPES, hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=5)))
def test_any_array_is_accepted_or_refused_clearly(X):
    try:
        images = ImageSequence(X)
    except (ValueError, TypeError) as exc:
        assert "X" in str(exc)
        return
    for i in range(len(images)):
        batch = resize_and_crop(images.load(i), 8, 6)
        assert batch.shape == (3, 6, 6)
        assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([None, 1, 3]),
    st.integers(1, 24),
    st.integers(1, 24),
    st.randoms(use_true_random=False),
)
def test_valid_images_of_any_size_give_the_crop(height, width, channels, size, crop, rnd):
    crop = min(crop, size)
    shape = (height, width) if channels is None else (height, width, channels)
    rng = np.random.default_rng(rnd.randint(0, 2**31))
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = resize_and_crop(load_image(image), size, crop)
    assert out.shape == (3, crop, crop)
    assert np.isfinite(out.numpy()).all()
    assert out.min() >= 0 and out.max() <= 1
