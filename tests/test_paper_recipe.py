"""The documented setting that reproduces the paper's recipe does exactly that."""

import ast
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from skprotoad import ProtoADDetector

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipe():
    """The keyword arguments of the README's "paper's exact recipe"."""
    text = README.read_text()
    match = re.search(r"paper's exact recipe\*\* is\s*`ProtoADDetector\(([^`]*)\)`", text)
    assert match, "README lost the paper's recipe"
    call = ast.parse(f"f({match.group(1)})", mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def test_paper_recipe_computes_the_papers_map(synthetic):
    recipe = _recipe()
    assert recipe["backbone"] == "wide_resnet50_2" and recipe["normalization"] == "patch"
    # the paper's geometry: resize 256, centre crop 224
    geometry = ProtoADDetector(**recipe).get_params()
    assert (geometry["image_size"], geometry["crop_size"]) == (256, 224)
    # random weights and small images: the arithmetic is what is checked
    det = ProtoADDetector(**{
        **recipe, "weights": None, "image_size": 72, "crop_size": 64, "clustering": "kmeans",
        "n_clusters": 12, "random_state": 0, "device": "cpu",
    }).fit(synthetic.X_train[:4])
    X = synthetic.X_test[:2]
    maps = det.anomaly_maps(X)

    from skprotoad.export import preprocess

    net = det.network_
    with torch.inference_mode():
        x = torch.from_numpy(preprocess(det, X))
        stages = net.embedding.backbone((x - net.embedding.mean) / net.embedding.std)
        size = stages[0].shape[-2:]
        # the reference code's join: coarse features repeated (nearest), one L2
        # normalisation over the concatenation
        joined = torch.cat([stages[0]] + [F.interpolate(m, size=size) for m in stages[1:]], 1)
        unit = F.normalize(joined, dim=1)
        prototypes = F.normalize(torch.from_numpy(det.prototypes_), dim=1)
        patch = 1 - torch.einsum("nchw,kc->nkhw", unit, prototypes).amax(1, keepdim=True)
        # cv2.resize-like bilinear upsampling to the crop, scipy's Gaussian, sigma 4
        up = F.interpolate(patch, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    expected = np.stack([gaussian_filter(m.numpy().astype(np.float64), 4.0) for m in up])
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    np.testing.assert_allclose(-det.score_samples(X), expected.max(axis=(1, 2)), atol=1e-4)
    assert det.network_.embedding.neighborhood_size == 1
    assert det.prototypes_.shape[0] == 12  # cluster means only, no farthest patches
