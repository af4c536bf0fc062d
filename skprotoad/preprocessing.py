"""The detector's image preprocessing: how images become model input.

:class:`~skprotoad.ProtoADDetector` reads every input form (arrays, PIL
images, files) as float RGB in [0, 1], resizes it (bilinear, antialiased) to
``image_size`` and centre-crops it to ``crop_size``; see
:doc:`/user_guide/geometry`. These are the functions it does that with, so
that another model (a peer method in a benchmark, a network used on its own)
sees exactly the detector's input.
"""

from __future__ import annotations

from ._images import ImageSequence, center_crop_box, check_geometry, load_image, resize_and_crop

__all__ = ["model_inputs", "load_image", "resize_and_crop", "center_crop_box"]


def model_inputs(X, image_size=256, crop_size=None, batch_size=16, *, indices=None, multiple=1):
    """Batches of model input, made from ``X`` as the detector makes them.

    Parameters
    ----------
    X : array of shape (n_images, H, W[, C]) or list of paths / PIL images / arrays
        As for :meth:`ProtoADDetector.fit <skprotoad.ProtoADDetector.fit>`;
        checked here, before the first batch.
    image_size : int, (height, width) or float, default=256
        The detector's ``image_size``.
    crop_size : int, (height, width) or None, default=None
        The detector's ``crop_size``.
    batch_size : int, default=16
        Images per batch.
    indices : sequence of int, default=None
        The images to read, in this order; all by default.
    multiple : int, default=1
        With a scale-factor ``image_size``, each side is rounded to a
        multiple of it (the detector uses the least common multiple of its
        backbone's strides) and a batch holds images of one size only.

    Yields
    ------
    batch_indices : list of int
        The images of the batch.
    batch : torch.Tensor of shape (B, 3, height, width), float32
        Their model input: RGB in [0, 1], before the mean / std
        normalisation, which is part of the network.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.preprocessing import model_inputs
    >>> X = np.zeros((5, 40, 60), dtype=np.uint8)
    >>> [(i, tuple(b.shape)) for i, b in model_inputs(X, 32, 24, batch_size=4)]
    [([0, 1, 2, 3], (4, 3, 24, 24)), ([4], (1, 3, 24, 24))]
    """
    check_geometry(image_size, crop_size)
    images = ImageSequence(X)
    return images.batches(batch_size, image_size, crop_size, indices=indices, multiple=multiple)
