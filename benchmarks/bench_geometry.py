"""Input geometry on magnetic_tile: squash + centre crop vs whole-image geometries.

The tiles are strips of varying size (width 103..632, height 222..403 px) and
aspect (0.36..2.6). The package default squashes each one to 256 x 256 and
centre-crops 224 x 224, so texture is stretched by a different factor per image
and the outer 12.5 % on each side (where border cracks and breaks are) is never
seen. This benchmark compares geometries under one protocol that covers every
pixel of every image: each method's map is carried back onto the whole image
(pixels a crop cut away get the nearest scored value) and, with the mask,
resampled to a common 256 x 256 evaluation grid. The image score is the maximum
over the pixels the method scored.

Features: efficientnet_lite0 stages 1..3, 3x3 aggregation, centred alignment,
FINCH merged to 1,000 prototypes, Gaussian sigma 4 (in input pixels), every 4th
training image (191), all 583 test images; ``normalization`` as in
``ProtoADDetector``. The ``padim_*`` variants score with PaDiM instead
(``benchmarks/anchors.py``: the same stages without aggregation, 100 random
dimensions, one Gaussian per position, so a fixed input size only), under
the same protocol.

    python benchmarks/bench_geometry.py [VARIANT ...] [--smoke] [--list]

Writes benchmarks/results/geometry.{json,md}. Data: Y. Huang, C. Qiu, K. Yuan,
"Surface defect saliency of magnetic tile", The Visual Computer 36, 85-96 (2020).
"""
import argparse
import json
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.clustering import learn_prototypes  # noqa: E402
from skprotoad.datasets import load_mvtec  # noqa: E402
from skprotoad.metrics import evaluate_maps  # noqa: E402
from skprotoad.network import PatchEmbedding, ProtoADNetwork, upsample  # noqa: E402
# the detector's own reader and resize, so that each geometry resamples as it does
from skprotoad.preprocessing import load_image, resize_and_crop  # noqa: E402

from anchors import PaDiM, PixelMaps  # noqa: E402

EVAL = 256  # evaluation grid


class GlobalScaleEmbedding(PatchEmbedding):
    """Raw joined features divided by one constant for all images (the mean
    patch norm of the first training batch): PatchCore's and PaDiM's raw
    magnitudes at the scale of ``normalization="image"``, Euclidean head."""

    scale = None

    def forward(self, images):
        f = self.join(images)
        if self.scale is None:
            self.scale = float(f.norm(dim=1).mean())
        return f / self.scale


def prepare(smoke, out):
    """The data, the backbone and the embeddings the variants read (module
    globals, as the variants below were written against them)."""
    global RESULTS, data, train, backbone, EMBEDDINGS, embedding, MASKS
    RESULTS = out
    data = load_mvtec(_common.data_dir("magnetic_tile"))
    train = data.train_paths[::4]
    if smoke:
        keep = list(range(0, len(data.test_paths), 40))
        data.test_paths = [data.test_paths[i] for i in keep]
        data.test_labels = data.test_labels[keep]
        data.test_mask_paths = [data.test_mask_paths[i] for i in keep]
        train = train[:6]
    backbone = create_feature_extractor("efficientnet_lite0", (1, 2, 3))
    EMBEDDINGS = {
        norm: PatchEmbedding(backbone, neighborhood_size=3, normalization=norm).eval()
        for norm in ("patch", "image")
    }
    EMBEDDINGS["global"] = GlobalScaleEmbedding(backbone, neighborhood_size=3,
                                                normalization="image").eval()
    embedding = EMBEDDINGS["patch"]
    MASKS = masks_on_grid(data.test_mask_paths)


class PositionEmbedding(torch.nn.Module):
    """``base``'s features plus the patch position as two channels in [-w, w].

    Lets a prototype stand for "this texture at this place of the image", the
    position dependence PaDiM's per-position Gaussians have. With per-patch
    normalisation the result is normalised again.
    """

    def __init__(self, base, weight):
        super().__init__()
        self.base, self.weight = base, weight
        self.backbone, self.alignment = base.backbone, base.alignment
        self.normalization, self.n_channels = base.normalization, base.n_channels + 2

    def forward(self, x):
        f = self.base(x)
        n, _, h, w = f.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        f = torch.cat([f, self.weight * torch.stack([yy, xx]).expand(n, 2, h, w)], 1)
        return torch.nn.functional.normalize(f, dim=1) if self.normalization == "patch" else f


def model_input(image, geometry):
    """Model input (3, H, W) and the box (top, left, h, w) the image occupies."""
    kind, size = geometry
    h, w = image.shape
    if kind == "squash":
        return resize_and_crop(image, size, None), (0, 0, size, size)
    if kind == "letterbox":
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        top, left = (size - nh) // 2, (size - nw) // 2
        out = np.full((size, size), 0.45, dtype=np.float32)  # about the ImageNet mean
        out[top:top + nh, left:left + nw] = resize_and_crop(image, (nh, nw), None)[0].numpy()
        return torch.from_numpy(out).expand(3, -1, -1), (top, left, nh, nw)
    # "native": one scale for every image: texture keeps its size; multiple of
    # 16 so the stages tile the image exactly
    nh = max(32, int(round(h * size / 16)) * 16)
    nw = max(32, int(round(w * size / 16)) * 16)
    return resize_and_crop(image, (nh, nw), None), (0, 0, nh, nw)


def features(paths, geometry, crop, embed=None):
    """Per image: features (C, h, w) (``embed``: another map of the batch)."""
    embed = embed or embedding
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), 16):
            xs = []
            for p in paths[start:start + 16]:
                x, _ = model_input(load_image(p), geometry)
                if crop:
                    m = (x.shape[-1] - crop) // 2
                    x = x[:, m:m + crop, m:m + crop]
                xs.append(x)
            if len({x.shape for x in xs}) == 1:
                out.extend(embed(torch.stack(xs)))
            else:
                out.extend(embed(x[None])[0] for x in xs)
    return out


def eval_grid(m, box, crop_margin):
    """Map on the input -> the image's region -> EVAL x EVAL grid."""
    if crop_margin:
        m = np.pad(m, crop_margin, mode="edge")
    top, left, h, w = box
    m = np.ascontiguousarray(m[top:top + h, left:left + w], dtype=np.float32)
    # bilinear in Pillow, unclipped: the maps are not images in [0, 1]
    return np.asarray(Image.fromarray(m, mode="F").resize((EVAL, EVAL), Image.BILINEAR))


def masks_on_grid(paths):
    out = np.zeros((len(paths), EVAL, EVAL), dtype=bool)
    for i, p in enumerate(paths):
        if p is not None:
            mask = Image.open(p).convert("L").resize((EVAL, EVAL), Image.NEAREST)
            out[i] = np.asarray(mask) > 127
    return out


ROWS = []


class UnitPaDiM(PaDiM):
    """PaDiM on L2-normalised joined features: directions only, no magnitude.

    Rescaled to the mean norm of the first training image's raw features, so
    that the covariance regularisation (eps I) weighs as much as in PaDiM.
    """

    scale = None

    def patch_features(self, maps):
        from anchors import join_stages

        joined = join_stages(maps, self.strides)
        if self.scale is None:
            self.scale = float(joined.norm(dim=1).mean())
        joined = self.scale * torch.nn.functional.normalize(joined, dim=1)
        return joined.index_select(1, self.dims).permute(0, 2, 3, 1)


class DiagPaDiM(PaDiM):
    """PaDiM with diagonal covariances: per position, per dimension, a mean and
    a variance (+ eps); tells whether PaDiM's edge needs the full covariance."""

    def fit(self, batches):
        from anchors import gaussian_statistics

        mean, cov = gaussian_statistics((self.patch_features(m) for m in batches), self.eps)
        self.mean = mean.float()
        self.inv_cov = (1.0 / torch.diagonal(cov, dim1=-2, dim2=-1)).float()
        return self

    def patch_scores(self, features):
        return (((features - self.mean) ** 2) * self.inv_cov).sum(-1).sqrt()


def stage_maps(x):
    """The backbone's stage maps of a batch, as PaDiM takes them."""
    e = embedding
    return e.backbone((x - e.mean) / e.std)


def input_maps(paths, geometry, crop, predict):
    """Per image: (map on the model input, box, crop margin); ``predict``
    maps a batch of one input size to its maps."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), 16):
            prepared = [model_input(load_image(p), geometry) for p in paths[start:start + 16]]
            margin = 0
            if crop:
                margin = (prepared[0][0].shape[-1] - crop) // 2
                prepared = [(x[:, margin:margin + crop, margin:margin + crop], box)
                            for x, box in prepared]
            # images of one size go through the network together
            by_size = {}
            for i, (x, _) in enumerate(prepared):
                by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
            batch_maps = [None] * len(prepared)
            for size, idx in by_size.items():
                batch = torch.stack([prepared[i][0] for i in idx])
                for i, m in zip(idx, predict(batch, size)):
                    batch_maps[i] = m
            out += [(m, box, margin) for m, (_, box) in zip(batch_maps, prepared)]
    return out


def norm_statistics(paths, geometry, crop):
    """Per grid position: mean and spread of the log patch norm of the raw
    features (globally scaled), over the images at ``paths`` (one size)."""
    logs = torch.stack([f.norm(dim=0).log() for f in
                        features(paths, geometry, crop, embed=EMBEDDINGS["global"])])
    return logs.mean(0), logs.std(0) + 1e-3


def run(name, geometry, crop=None, normalization="patch", method="protoad", position=0.0,
        posnorm=None, norm_weight=0.0, score="max", n_clusters=1000):
    t = time.time()
    fit_paths = train
    if posnorm:
        # every 5th training image is held out: its maps give the normal
        # map's mean (and spread) at each pixel of the (fixed-size) input
        fit_paths = [p for i, p in enumerate(train) if i % 5]
    if method in ("padim", "padim_unit", "padim_diag"):
        # one Gaussian per position: all images of one size (squash)
        tr = features(fit_paths, geometry, crop, embed=lambda x: list(zip(*stage_maps(x))))
        padim = {"padim": PaDiM, "padim_unit": UnitPaDiM, "padim_diag": DiagPaDiM}[method](
            backbone.strides, sum(backbone.channels), tuple(
            s * backbone.strides[0] for s in tr[0][0].shape[-2:]))
        padim.fit([m[None] for m in stage] for stage in tr)
        X = np.empty((sum(m[0].shape[-2] * m[0].shape[-1] for m in tr), 1))

        def predict(batch, size):
            return padim(stage_maps(batch))[0].numpy()
    else:
        embedding_ = EMBEDDINGS[normalization]
        if position:
            embedding_ = PositionEmbedding(embedding_, position)
        tr = features(fit_paths, geometry, crop, embed=embedding_)
        X = np.concatenate([f.permute(1, 2, 0).reshape(-1, f.shape[0]).numpy() for f in tr])
        protos = torch.from_numpy(learn_prototypes(
            X, n_clusters=min(n_clusters, len(X) // 10), random_state=0,
            normalize=normalization == "patch"))  # "global": raw means too
        networks = {}

        if norm_weight:
            # PaDiM-like use of magnitude: how unusual a patch's norm is at its
            # position, |z| of the log norm, added to the map (fixed size only)
            stats = norm_statistics(fit_paths, geometry, crop)
            pixel_maps = PixelMaps(backbone.strides[0], tuple(
                s * backbone.strides[0] for s in stats[0].shape), 4.0)

        def predict(batch, size):
            if size not in networks:
                networks[size] = ProtoADNetwork(embedding_, protos, size, 4.0).eval()
                # score="cosine": the image score from 1 - max cosine to the same
                # prototypes (a unit-feature network), the map from ``normalization``
                networks[size, "cosine"] = ProtoADNetwork(
                    EMBEDDINGS["patch"], protos, size, 4.0).eval()
            # the features once: the projection score below reads them again
            features = embedding_(batch)
            maps = networks[size].head(features, size)[0]
            if norm_weight:
                z = (EMBEDDINGS["global"](batch).norm(dim=1).log() - stats[0]) / stats[1]
                maps = maps + norm_weight * pixel_maps(z.abs())[0]
            if score.startswith("cosine"):
                return torch.stack([maps, networks[size, "cosine"](batch)[0]], 1).numpy()
            if score == "projection":
                # the image score from |x| (1 - max cosine) of the per-image
                # scaled features (image_score="projection"), as a map
                net = networks[size]
                unit = torch.nn.functional.normalize(net.prototypes, dim=1)
                best = torch.einsum("nchw,kc->nkhw", features, unit).amax(dim=1, keepdim=True)
                second = net.smoothing(upsample(features.norm(dim=1, keepdim=True) - best,
                                                backbone.strides[0], size,
                                                net.embedding.alignment)[:, 0])
                return torch.stack([maps, second], 1).numpy()
            return maps.numpy()
    t_fit = time.time() - t
    shift, spread = 0.0, 1.0
    if posnorm in ("mean", "z"):  # "none": held out, maps left as they are
        normal = np.stack([m for m, _, _ in input_maps(train[::5], geometry, crop, predict)])
        shift = normal.mean(axis=0)
        spread = normal.std(axis=0) + 1e-3 if posnorm == "z" else 1.0
    t = time.time()
    maps, scores = [], []
    for m, box, margin in input_maps(data.test_paths, geometry, crop, predict):
        m, score_map = (m[0], m[1]) if m.ndim == 3 else (m, m)
        m = (m - shift) / spread
        score_map = score_map if score.startswith(("cosine", "projection")) else m
        # the score: max over the scored pixels of the image itself (not padding)
        valid = score_map if margin else score_map[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
        # "...-mean": the peak above the image's own mean level
        scores.append(valid.max() - (valid.mean() if score.endswith("-mean") else 0.0))
        maps.append(eval_grid(m, box, margin))
    t_test = time.time() - t
    r = evaluate_maps(data.test_labels, np.array(scores), MASKS, np.stack(maps))
    row = {"variant": name, "method": method, "normalization": normalization,
           "position": position, "norm_weight": norm_weight, "position_norm": posnorm, "n_train": len(fit_paths),
           "score": score, "n_prototypes": len(protos) if method == "protoad" else None,
           "geometry": f"{geometry[0]} {geometry[1]}", "crop": crop,
           "n_patches_train": len(X), **{k: round(v, 4) for k, v in r.items()},
           "fit_s": round(t_fit), "test_img_per_s": round(len(maps) / t_test, 1)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    write()


def write():
    out = RESULTS
    path = out / "geometry.json"
    rows = {r["variant"]: r for r in _common.read_json(path, [])}
    rows.update({r["variant"]: r for r in ROWS})
    rows = list(rows.values())
    _common.write_json(path, rows)
    cols = ["variant", "method", "normalization", "position", "position_norm", "score",
            "n_prototypes", "n_train",
            "geometry", "crop", "n_patches_train", "image_auroc", "pixel_auroc",
            "aupro", "pixel_f1_max", "fit_s", "test_img_per_s"]
    lines = ["# Input geometry on magnetic_tile (efficientnet_lite0)", "",
             "Command: `python benchmarks/bench_geometry.py`", "",
             f"Train: every 4th of train/good ({len(train)} images); test: all "
             f"{len(data.test_paths)} test images. Every pixel of every image is evaluated, "
             f"on a {EVAL} x {EVAL} grid (see the script's docstring). Times on a shared "
             "2-core machine, one image at a time.", ""]
    lines += _common.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    _common.write_markdown(out / "geometry.md", lines)


VARIANTS = {
    "squash256_crop224": (("squash", 256), 224),
    "native0.75": (("native", 0.75), None),
    "squash224": (("squash", 224), None),
    "letterbox288": (("letterbox", 288), None),
    "squash224_image": (("squash", 224), None, "image"),
    "native0.75_image": (("native", 0.75), None, "image"),
    "squash256_crop224_image": (("squash", 256), 224, "image"),
    "padim_squash224": (("squash", 224), None, "patch", "padim"),
    "padim_diag_squash224": (("squash", 224), None, "patch", "padim_diag"),
    "padim_unit_squash224": (("squash", 224), None, "patch", "padim_unit"),
    "squash224_global": (("squash", 224), None, "global"),
    "squash224_global_pos0.25": (("squash", 224), None, "global", "protoad", 0.25),
    "squash224_posnorm_z": (("squash", 224), None, "patch", "protoad", 0.0, "z"),
    "squash224_posnorm_mean": (("squash", 224), None, "patch", "protoad", 0.0, "mean"),
    "squash224_image_posnorm_z": (("squash", 224), None, "image", "protoad", 0.0, "z"),
    "squash224_image_posnorm_mean": (("squash", 224), None, "image", "protoad", 0.0, "mean"),
    "padim_squash224_n152": (("squash", 224), None, "patch", "padim", 0.0, "none"),
    "squash224_normz0.02": (("squash", 224), None, "patch", "protoad", 0.0, None, 0.02),
    "squash224_normz0.05": (("squash", 224), None, "patch", "protoad", 0.0, None, 0.05),
    "squash224_pos0.25": (("squash", 224), None, "patch", "protoad", 0.25),
    "squash224_pos0.1": (("squash", 224), None, "patch", "protoad", 0.1),
    "squash224_image_pos0.25": (("squash", 224), None, "image", "protoad", 0.25),
    "padim_squash256_crop224": (("squash", 256), 224, "patch", "padim"),
}
VARIANTS.update({
    # the map from normalization="image", the image score from the cosine
    # readout of the same prototypes
    "squash224_image_cosscore": (("squash", 224), None, "image", "protoad", 0.0, None, 0.0, "cosine"),
    "native0.75_image_cosscore": (("native", 0.75), None, "image", "protoad", 0.0, None, 0.0, "cosine"),
    "native0.75_image_cosscore_K2000": (("native", 0.75), None, "image", "protoad", 0.0, None, 0.0,
                                        "cosine", 2000),
    "native0.75_K2000": (("native", 0.75), None, "patch", "protoad", 0.0, None, 0.0, "max", 2000),
    # the factor that brings the median training image (sqrt of its area: 317 px) to 224
    "native0.71_image_cosscore": (("native", 0.706), None, "image", "protoad", 0.0, None, 0.0, "cosine"),
    "native0.71": (("native", 0.706), None),
    # the factor that brings it to 256 (the paper's resize)
    "native0.81_image_cosscore": (("native", 0.807), None, "image", "protoad", 0.0, None, 0.0, "cosine"),
    "native0.81_image_cosscore_K2000": (("native", 0.807), None, "image", "protoad", 0.0, None, 0.0,
                                        "cosine", 2000),
    "native0.71_image_cosscore_K2000": (("native", 0.706), None, "image", "protoad", 0.0, None, 0.0,
                                        "cosine", 2000),
    "native0.75_max-mean": (("native", 0.75), None, "patch", "protoad", 0.0, None, 0.0, "max-mean"),
    "native0.75_image_cosscore-mean": (("native", 0.75), None, "image", "protoad", 0.0, None, 0.0,
                                       "cosine-mean"),
    "squash224_max-mean": (("squash", 224), None, "patch", "protoad", 0.0, None, 0.0, "max-mean"),
    # the image score from the projection readout (the package default)
    "squash224_image_projscore": (("squash", 224), None, "image", "protoad", 0.0, None, 0.0,
                                  "projection"),
    "native0.75_image_projscore": (("native", 0.75), None, "image", "protoad", 0.0, None, 0.0,
                                   "projection"),
    "native0.81_image_projscore": (("native", 0.807), None, "image", "protoad", 0.0, None, 0.0,
                                   "projection"),
})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick run of the code paths on a few images; results go to "
                             "/tmp/results unless --out says otherwise")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default: {_common.RESULTS})")
    args = parser.parse_args(argv)
    chosen = _common.chosen_variants(parser, args, list(VARIANTS))
    if chosen is None:
        return
    torch.set_num_threads(2)
    default_out = Path("/tmp") / "results" if args.smoke else _common.RESULTS
    prepare(args.smoke, args.out or default_out)
    for name, spec in VARIANTS.items():
        if name in chosen:
            run(name, *spec)


if __name__ == "__main__":
    main()
