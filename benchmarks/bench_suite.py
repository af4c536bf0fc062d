"""The real-data suite: settings of ProtoADDetector on every data set at hand.

Runs each named setting, with each seed, on every MVTec-layout data set it
finds (``../shared/data/{magnetic_tile,bsdata_pitting,tire}``, plus the folders
named in ``SKPROTOAD_DATA``, separated by ``os.pathsep``; a folder that holds
such data sets is searched one level down) and on two generated sets:
``synthetic_textures`` (:func:`skprotoad.datasets.make_defect_dataset`) and
``synthetic_objects`` (screws at random position and rotation on a plain
background, ``kind="object"``), and reports per set:

- image AUROC, pixel AUROC and AUPRO@0.3 under two protocols. ``crop``: on the
  model's input (masks resized and cropped alike; for a model without a crop,
  the whole image). ``whole``: every pixel of the input image counts, on a
  256 x 256 grid over the whole image: the pixels a crop discards get the
  lowest value of the image's map, so that a crop model cannot detect there;
- the false-positive rate on the set's unseen normal test images and the
  detection rate on its defective ones at the fitted threshold (``predict``,
  ``contamination="auto"``), and the same for the pixel threshold's masks
  (``mask_fpr``: share of normal test images with a non-empty mask;
  ``verdict_mask_agreement``: share of test images whose verdict and mask
  agree, anomalous with a mask or normal without one).

    python benchmarks/bench_suite.py --settings defaults paper --seeds 0 1 2
    python benchmarks/bench_suite.py --settings defaults --sets tire --max-train 100

Next to the settings of ProtoADDetector runs a peer, ``padim``: PaDiM from
``benchmarks/anchors.py`` (the implementation ``bench_anchors.py`` measures),
fed as there (efficientnet_lite0 stages 1, 2, 3, 256 resize / 224 centre crop,
ImageNet normalisation) on the same training subset, test images, masks and
metrics. PaDiM has no threshold of its own; it gets the rule of
``contamination="auto"``: fit on the training images less the held-out 20 %
(the images ProtoADDetector(random_state=seed) holds out), threshold = the
split-conformal order statistic of their scores (and of their map maxima for
the pixel threshold: the same, as PaDiM's image score is the map's maximum),
then refit on all training images. The seed also picks PaDiM's random feature
dimensions.

    python benchmarks/bench_suite.py --settings padim --seeds 0 1 2 --max-train 200

Results go to ``benchmarks/results/suite.json`` (merged with earlier runs,
keyed by set, setting, seed and training-set size) and ``suite.md`` (means
over seeds, per set, and the mean over the sets).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad, not whichever one is installed

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from PIL import Image  # noqa: E402

from anchors import PaDiM  # noqa: E402
from bench_anchors import normalise  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.datasets import load_masks, load_mvtec, make_defect_dataset  # noqa: E402
from skprotoad.metrics import evaluate_maps, image_auroc  # noqa: E402
# the peer is fed, and the masks cropped, exactly as the detector's input; its
# thresholds follow the rule of contamination="auto", on the same held-out images
from skprotoad.preprocessing import center_crop_box, model_inputs  # noqa: E402
from skprotoad.thresholds import calibration_folds, conformal_threshold  # noqa: E402

SHARED_SETS = ("magnetic_tile", "bsdata_pitting", "tire")
SYNTHETIC_SETS = ("synthetic_textures", "synthetic_objects")
WHOLE_GRID = 256  # the whole-image protocol's evaluation grid

PAPER = dict(normalization="patch", neighborhood_size=1, alignment="paper", n_farthest=0,
             image_size=256, crop_size=224)
SETTINGS = {
    # the package's defaults, whatever they are when the suite runs
    "defaults": dict(),
    # far1000_whole256 with the image score read against the held-out images'
    # mean score map (position_baseline=True, the default since 2026-11-30)
    "whole256_baseline": dict(neighborhood_size=3, normalization="image",
                              image_score="projection", image_size=256, crop_size=None,
                              n_farthest=1000, position_baseline=True),
    # the paper's recipe with the offline backbone and the default geometry
    "paper": PAPER,
    # the defaults of 2026-11-29 (before the suite), named explicitly
    "nov29": dict(neighborhood_size=3, normalization="image", image_score="projection",
                  image_size=256, crop_size=224, n_farthest=0),
    "nov29_nbhd1": dict(neighborhood_size=1, normalization="image", image_score="projection",
                        image_size=256, crop_size=224, n_farthest=0),
    # cluster means plus the farthest training patches (greedy k-center)
    "nov29_far250": dict(neighborhood_size=3, normalization="image", image_score="projection",
                         image_size=256, crop_size=224, n_farthest=250),
    "nov29_far1000": dict(neighborhood_size=3, normalization="image",
                          image_score="projection", image_size=256, crop_size=224,
                          n_farthest=1000),
    "nov29_far1000_whole": dict(neighborhood_size=3, normalization="image",
                                image_score="projection", image_size=224, crop_size=None,
                                n_farthest=1000),
    # nov29_far1000 on the whole image at the crop's resolution (nothing discarded)
    "far1000_whole256": dict(neighborhood_size=3, normalization="image",
                             image_score="projection", image_size=256, crop_size=None,
                             n_farthest=1000),
    # (rows named "nov30_cap_random" in the results: the defaults before commit
    # "Capped fit: each image keeps ... farthest from the drawn ones", when the
    # cap's sample was a plain random draw; no parameter reproduces it now)
    # (rows named "nov30_once_fitpart" and "nov30_once_partition": two trials,
    # reverted, of fitting with one clustering under contamination="auto":
    # commit d88572c clustered the fit part only and gave the final model
    # those means plus all images' farthest patches; commit 4d9889b clustered
    # all patches and gave the calibration model the fit part's means in the
    # same clusters. Rows "nov30_once_assign": branch once-assign, commit
    # aeacbed, not merged: the fit part clustered once, the held-out patches
    # added to their most similar cluster for the final means; calibration
    # identical to the defaults'. See the note of issue #20.)
    # the default whole image without the patch cap (max_patches=None)
    "whole256_nocap": dict(neighborhood_size=3, normalization="image",
                           image_score="projection", image_size=256, crop_size=None,
                           n_farthest=1000, max_patches=None),
    # the same, the image mirrored past its border for the backbone (padding="reflect")
    "whole256_reflect": dict(neighborhood_size=3, normalization="image",
                             image_score="projection", image_size=256, crop_size=None,
                             n_farthest=1000, padding="reflect"),
    # the defaults with k-means instead of FINCH (FINCH's licence: docs/clustering.md)
    "kmeans1000": dict(clustering="kmeans", n_clusters=1000, image_size=256, crop_size=224),
    # the paper's per-patch normalisation with centred alignment
    "patch_nbhd1": dict(neighborhood_size=1, normalization="patch", image_size=256,
                        crop_size=224, n_farthest=0),
}
# The settings above but "defaults" and "whole256_baseline" were measured
# before position_baseline existed: their image score is the plain maximum
# of the score map.
for _name in set(SETTINGS) - {"defaults", "whole256_baseline"}:
    SETTINGS[_name] = {"position_baseline": False, **SETTINGS[_name]}
# today's defaults but for one parameter (position_baseline as in the defaults)
SETTINGS.update({
    "score_map": dict(image_score="map"),
    "map_euclidean": dict(map_metric="euclidean"),
    # the image score's metric half-way to the whitened map's
    "score_whiten05": dict(score_whitening=0.5),
    "score_cosine": dict(image_score="cosine"),
    "nbhd1": dict(neighborhood_size=1),
    "nbhd5": dict(neighborhood_size=5),
    "norm_patch": dict(normalization="patch"),
    "clusters500": dict(n_clusters=500),
    "clusters2000": dict(n_clusters=2000),
    "sigma2": dict(sigma=2.0),
    "sigma8": dict(sigma=8.0),
    "reflect": dict(padding="reflect"),
    # more of the prototypes from farthest-point rows: the same head size
    # (2,000) with fewer cluster means, and 1,000 more farthest rows
    "clusters500_far1500": dict(n_clusters=500, n_farthest=1500),
    "far2000": dict(n_farthest=2000),
    # BSData's 1130 x 460 images at their own aspect (about as many patches
    # as 256 x 256), without and with mirroring: is the squash what costs
    # mirroring there?
    "aspect160x400": dict(image_size=(160, 400)),
    "aspect160x400_reflect": dict(image_size=(160, 400), padding="reflect"),
})
COMMON = dict(backbone="efficientnet_lite0")
# peers: other methods on the same backbone, crop, data and metrics (run_peer)
PEER_INPUT = dict(backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=256,
                  crop_size=224)
PEERS = {
    "padim": dict(method="padim", n_features=100, **PEER_INPUT),
    # the same on the whole image, the detector's default geometry
    "padim_whole256": dict(method="padim", n_features=100,
                           **{**PEER_INPUT, "crop_size": None}),
}
PEER_BATCH = 16  # images per backbone call, so that no set's stage maps are held


def find_sets(names=None):
    """{name: folder} of the MVTec-layout sets found, in a stable order."""
    folders = {name: _common.SHARED_DATA / name for name in SHARED_SETS}
    for name, folder in _common.env_data_sets().items():
        folders.setdefault(name, folder)
    found = {n: f for n, f in folders.items() if _common.is_mvtec_set(f)}
    found.update({name: None for name in SYNTHETIC_SETS})
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            sys.exit(f"data sets not found: {missing}; found {sorted(found)}")
        found = {n: found[n] for n in names}
    return found


class _Set:
    """Training images, test images, labels, defect types and a mask reader."""

    def __init__(self, name, folder, max_train):
        self.name = name
        if folder is None:
            kind = "object" if name == "synthetic_objects" else "texture"
            data = make_defect_dataset(
                n_train=200, n_test=160, image_size=256, random_state=0, kind=kind
            )
            self.train, self.test = data.X_train, data.X_test
            self.labels = np.asarray(data.y_test)
            self.types = np.where(self.labels == 1, "defect", "good")
            self._masks = data.masks_test
            self._mask_paths = None
            self.source = f"make_defect_dataset(kind={kind!r}, 200 train / 160 test, 256 px)"
        else:
            data = load_mvtec(folder)
            self.train, self.test = list(data.train_paths), list(data.test_paths)
            self.labels = np.asarray(data.test_labels)
            self.types = np.asarray(data.test_defect_types)
            self._mask_paths = data.test_mask_paths
            self._masks = None
            self.source = str(folder)
        if max_train and max_train < len(self.train):
            keep = np.sort(np.random.default_rng(0).permutation(len(self.train))[:max_train])
            self.train = [self.train[i] for i in keep] if isinstance(self.train, list) else (
                self.train[keep])
        self.n_train = len(self.train)

    def masks(self, image_size, crop_size):
        """Masks resized (nearest) to ``image_size`` and centre-cropped, as
        :func:`skprotoad.datasets.load_masks` does for mask files."""
        if self._masks is None:
            return load_masks(self._mask_paths, image_size, crop_size)
        top, left, height, width = center_crop_box(image_size, crop_size)
        size_h, size_w = center_crop_box(image_size, None)[2:]
        out = np.zeros((len(self._masks), height, width), dtype=bool)
        for i, m in enumerate(self._masks):
            resized = Image.fromarray(m.astype(np.uint8) * 255).resize((size_w, size_h),
                                                                        Image.NEAREST)
            out[i] = (np.asarray(resized) > 127)[top:top + height, left:left + width]
        return out


def _to_grid(arrays):
    """(n, h, w) maps resampled to the WHOLE_GRID x WHOLE_GRID grid (bilinear)."""
    t = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(WHOLE_GRID,) * 2, mode="bilinear",
                         align_corners=False)[:, 0].numpy()


def _whole_grid(maps, image_size, crop_size):
    """Crop maps placed on the resized image and resampled to the whole grid.

    The whole protocol: each map goes where its crop was taken from the resized
    image, the discarded border gets the map's minimum (a crop model cannot
    detect there), and everything is resampled to WHOLE_GRID x WHOLE_GRID, so
    that every setting is evaluated on the same pixels.
    """
    top, left, height, width = center_crop_box(image_size, crop_size)
    size_h, size_w = center_crop_box(image_size, None)[2:]
    canvas = np.repeat(maps.reshape(len(maps), -1).min(axis=1)[:, None, None], size_h, axis=1)
    canvas = np.repeat(canvas, size_w, axis=2)
    canvas[:, top:top + height, left:left + width] = maps
    return _to_grid(canvas)


def _evaluate(data, maps, scores, image_size, crop_size, threshold, pixel_threshold):
    """The suite's metrics of test maps and image scores (higher = more anomalous).

    ``threshold``: image scores above it are flagged; ``pixel_threshold``:
    map values above it are mask pixels.
    """
    labels = data.labels
    row = {}
    crop = evaluate_maps(labels, scores, data.masks(image_size, crop_size), maps)
    whole = evaluate_maps(labels, scores, data.masks(WHOLE_GRID, None),
                          _whole_grid(maps, image_size, crop_size))
    for prefix, metrics in (("crop", crop), ("whole", whole)):
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            row[f"{prefix}_{key}"] = round(float(metrics[key]), 4)
    flagged = scores > threshold
    normal = labels == 0
    row["fpr"] = round(float(flagged[normal].mean()), 4)
    row["tpr"] = round(float(flagged[~normal].mean()), 4)
    with_mask = maps.reshape(len(maps), -1).max(axis=1) > pixel_threshold
    row["mask_fpr"] = round(float(with_mask[normal].mean()), 4)
    row["verdict_mask_agreement"] = round(float((with_mask == flagged).mean()), 4)
    row["image_auroc_by_type"] = {
        t: round(float(image_auroc(labels[keep], scores[keep])), 4)
        for t in sorted(set(data.types) - {"good"})
        for keep in [(data.types == t) | (data.types == "good")]
    }
    return row


def run_one(data, setting, seed, cache):
    params = {**COMMON, **SETTINGS[setting], "random_state": seed, "memory": cache}
    det = ProtoADDetector(**params)
    if isinstance(det.image_size, float):
        raise ValueError("the suite evaluates fixed-size geometries only")
    start = time.perf_counter()
    det.fit(data.train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    maps, neg_scores = det.anomaly_maps(data.test, return_scores=True)
    test_seconds = time.perf_counter() - start
    scores = -neg_scores
    labels = data.labels
    row = {
        "set": data.name, "setting": setting, "seed": seed, "n_train": data.n_train,
        "n_test": len(labels), "params": {k: v for k, v in SETTINGS[setting].items()},
        "n_prototypes": int(det.prototypes_.shape[0]),
    }
    row.update(_evaluate(data, maps, scores, det.image_size, det.crop_size,
                         -det.offset_, det.pixel_threshold_))
    row["offset"] = float(det.offset_)
    return _with_scores(row, det.calibration_scores_, scores, labels, fit_seconds, test_seconds)


def _with_scores(row, calibration, scores, labels, fit_seconds, test_seconds):
    """``row`` with the held-out and test images' anomaly scores and the times."""
    row["calibration_scores"] = [round(float(v), 5) for v in calibration]
    row["test_scores_good"] = [round(float(v), 5) for v in scores[labels == 0]]
    # every test image's anomaly score and label, in the set's order: paired
    # comparisons of settings on the same images (bench_paired_auroc.py)
    row["test_scores"] = [float(f"{v:.6g}") for v in scores]
    row["test_labels"] = [int(v) for v in labels]
    row["fit_seconds"] = round(fit_seconds, 1)
    row["test_images_per_second"] = round(len(labels) / test_seconds, 1)
    return row


def _stage_maps(images, extractor, indices, cfg):
    """Stage maps of ``images[indices]``, PEER_BATCH images at a time."""
    for _, batch in model_inputs(images, cfg["image_size"], cfg["crop_size"], PEER_BATCH,
                                 indices=list(indices)):
        yield normalise(batch, extractor)


def _fit_padim(images, extractor, indices, cfg, seed):
    crop = center_crop_box(cfg["image_size"], cfg["crop_size"])[2:]
    model = PaDiM(extractor.strides, sum(extractor.channels), crop, cfg["n_features"],
                  seed=seed)
    return model.fit(_stage_maps(images, extractor, indices, cfg)).eval()


def _peer_scores(model, images, extractor, indices, cfg):
    """(maps, image scores) as float32 arrays, scored batch by batch."""
    maps, scores = [], []
    for stage_maps in _stage_maps(images, extractor, indices, cfg):
        m, s = model(stage_maps)
        maps.append(m.numpy())
        scores.append(s.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def run_peer(data, setting, seed):
    """A peer method (PEERS) on the suite's data, protocol and metrics.

    Threshold as ProtoADDetector's ``contamination="auto"``: for each of its
    calibration folds, fit on the training images less the fold and score
    the fold; the conformal order statistic of all folds' scores (image
    threshold) and map maxima (pixel threshold); then refit on every training
    image for the test scores.
    """
    cfg = PEERS[setting]
    if cfg["method"] != "padim":
        raise ValueError(f"unknown peer method {cfg['method']!r}")
    extractor = create_feature_extractor(cfg["backbone"], cfg["layers"])
    train, test = data.train, data.test
    folds = calibration_folds(len(train), random_state=seed)
    start = time.perf_counter()
    with torch.inference_mode():
        if folds:
            calibration, map_maxima = [], []
            for fit_part, held_out in folds:
                model = _fit_padim(train, extractor, fit_part, cfg, seed)
                held_maps, held_scores = _peer_scores(model, train, extractor, held_out, cfg)
                map_maxima.append(held_maps.reshape(len(held_maps), -1).max(axis=1))
                calibration.append(held_scores)
                del held_maps, model
            calibration, map_maxima = np.concatenate(calibration), np.concatenate(map_maxima)
            threshold = conformal_threshold(calibration)
            pixel_threshold = conformal_threshold(map_maxima)
        model = _fit_padim(train, extractor, range(len(train)), cfg, seed)
        if not folds:
            # as the detector with too few images to hold any out: the worst
            # training image
            train_maps, train_scores = _peer_scores(model, train, extractor,
                                                    range(len(train)), cfg)
            threshold = float(train_scores.max())
            pixel_threshold = float(train_maps.max())
            calibration = np.empty(0)
            del train_maps
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        maps, scores = _peer_scores(model, test, extractor, range(len(test)), cfg)
        test_seconds = time.perf_counter() - start
    labels = data.labels
    row = {
        "set": data.name, "setting": setting, "seed": seed, "n_train": data.n_train,
        "n_test": len(labels),
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "n_prototypes": None,
    }
    row.update(_evaluate(data, maps, scores.astype(np.float64), cfg["image_size"],
                         cfg["crop_size"], threshold, pixel_threshold))
    row["offset"] = -float(threshold)
    return _with_scores(row, calibration, scores, labels, fit_seconds, test_seconds)


def _key(row):
    return f"{row['set']}|{row['setting']}|{row['seed']}|{row['n_train']}"


METRICS = ("crop_image_auroc", "crop_pixel_auroc", "crop_aupro", "whole_image_auroc",
           "whole_pixel_auroc", "whole_aupro", "fpr", "tpr", "mask_fpr",
           "verdict_mask_agreement", "normal_shift_auroc")


def normal_shift_auroc(row):
    """AUROC of the unseen normal test images' scores against the held-out
    calibration images': 0.5 when they are alike (the threshold's premise),
    above when the test normals score higher (it then under-estimates)."""
    held_out, test = row["calibration_scores"], row["test_scores_good"]
    if not held_out or not test:
        return None
    labels = np.r_[np.zeros(len(held_out)), np.ones(len(test))]
    return round(float(image_auroc(labels, np.r_[held_out, test])), 4)


def summarize(runs):
    """Mean (and min, max) over seeds per (set, setting, n_train)."""
    groups = {}
    for r in runs.values():
        groups.setdefault((r["set"], r["setting"], r["n_train"]), []).append(r)
    table = []
    for (name, setting, n_train), rows in sorted(groups.items()):
        entry = {"set": name, "setting": setting, "n_train": n_train,
                 "seeds": sorted(r["seed"] for r in rows)}
        for r in rows:
            r.setdefault("normal_shift_auroc", normal_shift_auroc(r))
        for m in METRICS:
            values = [r[m] for r in rows if r.get(m) is not None]
            entry[m] = (round(float(np.mean(values)), 4), round(min(values), 4),
                        round(max(values), 4)) if values else None
        table.append(entry)
    return table


def write_results(rows, out, command):
    path = out / "suite.json"
    old = _common.read_json(path, {"runs": {}, "commands": []})
    old["runs"].update({_key(r): r for r in rows})
    if command not in old["commands"]:
        old["commands"].append(command)
    old["machine"] = _common.machine()
    _common.write_json(path, old, indent=1)
    table = summarize(old["runs"])
    lines = [
        "# The real-data suite (efficientnet_lite0)",
        "",
        "Commands:",
        "",
        *[f"- `{c}`" for c in old["commands"]],
        "",
        f"Machine: {old['machine']}. Each cell: mean over the seeds listed "
        "(min-max in the JSON). `crop`: metrics on the model input, masks cropped "
        "alike; `whole`: every pixel of the image on a 256 x 256 grid (a crop's "
        "discarded border counts as undetected). FPR / TPR: share of normal / "
        "defective test images flagged at the fitted threshold; mask FPR: share of "
        "normal test images with a non-empty mask; agree: verdict and mask agree; "
        "shift: AUROC of the unseen normal test images' scores against the held-out "
        "calibration images' (0.5: alike; above: the threshold under-estimates).",
        "",
    ]
    cols = METRICS
    header = ("set", "setting", "n_train", "seeds", "image (crop)", "pixel (crop)",
              "AUPRO (crop)", "image (whole)", "pixel (whole)", "AUPRO (whole)", "FPR",
              "TPR", "mask FPR", "agree", "shift")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in table:
        cells = [e["set"], e["setting"], str(e["n_train"]), ",".join(map(str, e["seeds"]))]
        cells += ["" if e[c] is None else f"{e[c][0]:.3f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    # mean over sets, per setting and training-set size, so that a set run
    # at two sizes does not count twice
    lines += ["", "## Mean over sets (settings with every set of the table, at one "
              "training-set size)", ""]
    by_setting = {}
    for e in table:
        by_setting.setdefault((e["setting"], e["n_train"]), []).append(e)
    sets = sorted({e["set"] for e in table})
    lines += ["| setting | n_train | sets | " + " | ".join(header[4:]) + " |",
              "|" + "---|" * (len(header) - 1)]
    for (setting, n_train), entries in sorted(by_setting.items()):
        if sorted({e["set"] for e in entries}) != sets:
            continue
        means = [np.mean([e[c][0] for e in entries if e[c]] or [np.nan]) for c in cols]
        lines.append(f"| {setting} | {n_train} | {len(sets)} | "
                     + " | ".join(f"{m:.3f}" for m in means) + " |")
    _common.write_markdown(out / "suite.md", lines)


def variant_run(doc, variants, script, results_name, argv=None):
    """The arguments of a script that runs the defaults under named
    ``variants`` on the suite's sets (``--sets``, ``--variants``, ``--seeds``,
    ``--max-train``, ``--out``), the path of its JSON results and those
    results so far, this run's command appended: ``(args, path, results)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    path = args.out / f"{results_name}.json"
    return args, path, results_with_command(path, command)


def results_with_command(path, command):
    """The results stored at ``path`` (``{"commands": [...], "runs": {...}}``,
    empty when there are none yet), ``command`` appended: runs of several
    commands merge into one file."""
    results = _common.read_json(path, {"commands": [], "runs": {}})
    results["commands"].append(command)
    return results


def record_run(results, path, key, row, write_page):
    """Print ``row``, store it in ``results`` under ``key``, write them to
    ``path`` and call ``write_page(results)``: after every run, so that an
    interrupted script keeps what it measured."""
    print(json.dumps(row), flush=True)
    results["runs"][key] = row
    _common.write_json(path, results, indent=1)
    write_page(results)


def write_variant_markdown(path, title, results, description, header, rows):
    """The results page of a :func:`variant_run` script: ``title``, its
    commands, the machine and ``description``, then the table."""
    lines = [f"# {title}", "", "Commands:", ""]
    lines += [f"- `{c}`" for c in results["commands"]]
    lines += ["", f"Machine: {_common.machine()}. {description}", ""]
    lines += _common.markdown_table(header, rows)
    _common.write_markdown(path, lines)


def one_fit_run(doc, script, argv=None):
    """The arguments of a script that fits the defaults once per suite set
    (``--max-train``, ``--seed``, ``--sets``) and its command line:
    ``(args, command)``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", nargs="+", default=None)
    args = parser.parse_args(argv)
    command = (f"python benchmarks/{script} --max-train {args.max_train} --seed {args.seed}"
               + (" --sets " + " ".join(args.sets) if args.sets else ""))
    return args, command


def write_one_fit_results(name, command, results, title, description, header, rows):
    """``benchmarks/results/<name>.json`` (the command and ``results``) and
    ``<name>.md`` (``title``, the command, ``description``, the table) of a
    :func:`one_fit_run` script; the page is printed too."""
    _common.write_json(_common.RESULTS / f"{name}.json", {"command": command, "results": results})
    lines = [f"# {title}", "", f"Command: `{command}`", "", description, "",
             *_common.markdown_table(header, rows)]
    _common.write_markdown(_common.RESULTS / f"{name}.md", lines)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["defaults", "paper"],
                        choices=list(SETTINGS) + list(PEERS))
    parser.add_argument("--sets", nargs="+", default=None,
                        help="data set names (default: every set found)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train", type=int, default=None,
                        help="learn from this many training images per set (a seeded "
                             "subset; default: all)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs already in the results file")
    args = parser.parse_args(argv)
    done = set()
    if args.resume and (args.out / "suite.json").exists():
        done = set(json.loads((args.out / "suite.json").read_text())["runs"])
    command = "python benchmarks/bench_suite.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # features are extracted once per set, seed and feature-shaping setting
        cache = joblib.Memory(tmp, verbose=0)
        for name, folder in find_sets(args.sets).items():
            data = _Set(name, folder, args.max_train)
            for seed in args.seeds:
                for setting in args.settings:
                    if f"{name}|{setting}|{seed}|{data.n_train}" in done:
                        continue
                    if setting in PEERS:
                        row = run_peer(data, setting, seed)
                    else:
                        row = run_one(data, setting, seed, cache)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    write_results([row], args.out, command)
            cache.clear(warn=False)
    return rows


if __name__ == "__main__":
    main()
