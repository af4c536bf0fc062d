"""ProtoAD next to PatchCore and PaDiM on magnetic_tile, same backbone and crop.

    python benchmarks/bench_anchors.py [--train-step 4] [--data DIR] [--work DIR]

Every method sees the same efficientnet_lite0 stages (1, 2, 3) (strides 4, 8,
16; 176 channels joined at stride 4), the same 256-resize / 224-crop and the
same images. The backbone's stage maps are extracted once, in their own
subprocess, and cached under ``--work`` (outside the repository); each method
then fits and scores in a subprocess of its own, so that its peak RSS is its
own. Reported fit seconds = the measured training-feature extraction + the
method's own fit. Speed (images per second, inference with the backbone, at
batch 1 and 16) is measured in one process, methods alternated, medians of
repetitions. Results: benchmarks/results/anchors.{json,md,png}.

Data: Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of magnetic tile",
The Visual Computer 36, 85-96 (2020).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad, not whichever one is installed
from _common import peak_rss_mb

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from anchors import PaDiM, PatchCore, join_stages, local_average  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.datasets import load_masks, load_mvtec  # noqa: E402
from skprotoad.metrics import evaluate_maps  # noqa: E402
from skprotoad.network import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchEmbedding,
    ProtoADNetwork,
)
# the detector's own reading, resize and crop: the baselines see exactly its input
from skprotoad.preprocessing import model_inputs  # noqa: E402

DEFAULT_DATA = _common.data_dir("magnetic_tile")
DEFAULT_WORK = Path("/tmp/skprotoad_anchors")
BACKBONE, LAYERS = "efficientnet_lite0", (1, 2, 3)
IMAGE_SIZE, CROP = 256, 224
SEED = 0
METHODS = {
    "protoad_finch": dict(kind="protoad", clustering="finch", n_clusters=None),
    "protoad_kmeans1000": dict(kind="protoad", clustering="kmeans", n_clusters=1000),
    # PatchCore's 3x3 local aggregation before the join, as main's
    # ProtoADDetector(neighborhood_size=3) does (not in this branch's package)
    "protoad_finch_nbhd3": dict(kind="protoad", clustering="finch", n_clusters=None,
                                neighbourhood=3),
    # the estimator itself, fitted on the images (crop geometry): per-image
    # normalisation, distance maps, image scores from the cosine readout
    "protoad_image_cosine": dict(kind="detector", params=dict(
        normalization="image", image_score="cosine", n_clusters=1000)),
    "protoad_image_cosine_2000": dict(kind="detector", params=dict(
        normalization="image", image_score="cosine", n_clusters=2000)),
    # image scores from the projection readout: the package defaults (2,000)
    "protoad_image_projection": dict(kind="detector", params=dict(
        normalization="image", image_score="projection", n_clusters=1000)),
    "protoad_image_projection_2000": dict(kind="detector", params=dict(
        normalization="image", image_score="projection", n_clusters=2000)),
    "patchcore_1pct": dict(kind="patchcore", coreset_ratio=0.01),
    "padim_d100": dict(kind="padim", n_features=100),
}
# cheap first, so that a run cut short still reports the quick methods
ORDER = ["padim_d100", "protoad_finch", "protoad_kmeans1000", "patchcore_1pct",
         "protoad_finch_nbhd3", "protoad_image_cosine", "protoad_image_cosine_2000",
         "protoad_image_projection", "protoad_image_projection_2000"]
SPEED_IMAGES = 32


def normalise(batch, extractor):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # channels-last, as skprotoad's PatchEmbedding feeds its backbone: the
    # baselines get the same backbone speed
    return extractor(((batch - mean) / std).contiguous(memory_format=torch.channels_last))


def splits(args):
    """The data with its test split thinned by ``--test-step``, and the train subset."""
    data = load_mvtec(args.data)
    train = list(data.train_paths)[:: args.train_step]
    step = args.test_step
    data.test_paths = list(data.test_paths)[::step]
    data.test_labels = np.asarray(data.test_labels)[::step]
    data.test_mask_paths = list(data.test_mask_paths)[::step]
    return data, train


# ------------------------------------------------------------------ extract
def extract(paths, extractor, batch_size=16):
    """Stage maps of all ``paths`` as float32 arrays, and the seconds it took."""
    out, start = None, time.perf_counter()
    with torch.inference_mode():
        for chunk, batch in model_inputs(paths, IMAGE_SIZE, CROP, batch_size):
            maps = normalise(batch, extractor)
            if out is None:
                out = [np.empty((len(paths), *m.shape[1:]), np.float32) for m in maps]
            for o, m in zip(out, maps):
                o[chunk] = m.numpy()
    return out, time.perf_counter() - start


def stage_extract(args):
    data, train = splits(args)
    extractor = create_feature_extractor(BACKBONE, LAYERS)
    args.work.mkdir(parents=True, exist_ok=True)
    info = {"strides": list(extractor.strides), "channels": list(extractor.channels)}
    old_path = args.work / "extract.json"
    old = json.loads(old_path.read_text()) if old_path.exists() else {}
    for name, paths in (("train", train), ("test", data.test_paths)):
        if name == "test" and old.get("test_images") == len(paths):
            # the test split does not depend on --train-step: keep its cache
            info.update(test_images=len(paths), test_seconds=old["test_seconds"])
            continue
        maps, seconds = extract(paths, extractor)
        for i, m in enumerate(maps):
            np.save(args.work / f"{name}_{i}.npy", m)
        info[f"{name}_images"] = len(paths)
        info[f"{name}_seconds"] = seconds
        print(f"extracted {name}: {len(paths)} images in {seconds:.1f} s", flush=True)
    info["peak_rss_mb"] = peak_rss_mb()
    (args.work / "extract.json").write_text(json.dumps(info, indent=2))


def load_maps(work, name):
    """Cached stage maps as torch tensors (the arrays are read into memory)."""
    i, maps = 0, []
    while (work / f"{name}_{i}.npy").exists():
        maps.append(torch.from_numpy(np.load(work / f"{name}_{i}.npy")))
        i += 1
    return maps


def batched(maps, size=16):
    for s in range(0, len(maps[0]), size):
        yield [m[s : s + size] for m in maps]


# ------------------------------------------------------------------ methods
def protoad_features(maps, strides, cfg):
    """Unit patch features (N, C, h, w), optionally after local aggregation."""
    if cfg.get("neighbourhood", 1) > 1:
        maps = local_average(maps, cfg["neighbourhood"])
    return F.normalize(join_stages(maps, strides), dim=1)


def fit_protoad(cfg, train, strides):
    from skprotoad.clustering import learn_prototypes
    from sklearn.utils import check_random_state

    # same seed derivation as ProtoADDetector.fit(random_state=0)
    seed = int(check_random_state(SEED).randint(np.iinfo(np.int32).max))
    feats = protoad_features(train, strides, cfg).permute(0, 2, 3, 1)
    feats = feats.reshape(-1, feats.shape[-1]).numpy()
    protos = learn_prototypes(
        feats, method=cfg["clustering"], n_clusters=cfg["n_clusters"], random_state=seed
    )
    del feats
    embedding = PatchEmbedding(create_feature_extractor(BACKBONE, LAYERS))
    return ProtoADNetwork(embedding, torch.from_numpy(protos), (CROP, CROP), 4.0).eval()


def protoad_scorer(network, strides, cfg):
    def score(maps):
        return network.head(protoad_features(maps, strides, cfg))

    return score


def save_protoad(network, path):
    """Save the fitted network (what a fitted ProtoADDetector pickles, less its
    threshold and a few numbers): a hand-assembled detector would be refused
    on loading, and the speed stage needs the network only."""
    import joblib

    joblib.dump(network, path)


def check_protoad_matches_estimator(network, test_paths, test_maps, strides):
    """The cached-feature path gives the network's own maps on the images, as
    ``ProtoADDetector.anomaly_maps`` computes them (2 images)."""
    with torch.inference_mode():
        direct = torch.cat([network(batch)[0] for _, batch in
                            model_inputs(test_paths[:2], IMAGE_SIZE, (CROP, CROP), 2)]).numpy()
        cached = protoad_scorer(network, strides, {})([m[:2] for m in test_maps])[0].numpy()
    err = float(np.abs(direct - cached).max())
    if err > 1e-4:
        raise AssertionError(f"cached ProtoAD maps differ from the estimator's by {err}")
    return err


def stage_detector(args, name, cfg):
    """Fit and score ``ProtoADDetector`` itself on the images (not the cached
    stage maps), crop geometry, and save it for the speed stage."""
    import joblib

    data, train = splits(args)
    det = ProtoADDetector(backbone=BACKBONE, layers=LAYERS, image_size=IMAGE_SIZE,
                          crop_size=CROP, random_state=SEED, **cfg["params"])
    row = {"method": name, "n_train": len(train)}
    start = time.perf_counter()
    det.fit(train)
    row["fit_seconds"] = row["own_fit_seconds"] = time.perf_counter() - start
    row["n_prototypes"] = int(det.prototypes_.shape[0])
    row["peak_rss_fit_mb"] = peak_rss_mb()
    path = args.work / f"model_{name}"
    joblib.dump(det, path)
    row["model_mb"] = path.stat().st_size / 2**20
    start = time.perf_counter()
    maps, scores = det.anomaly_maps(data.test_paths, return_scores=True)
    row["test_seconds_from_images"] = time.perf_counter() - start
    masks = load_masks(data.test_mask_paths, IMAGE_SIZE, CROP)
    row.update(evaluate_maps(data.test_labels, -scores, masks, maps))
    row["peak_rss_mb"] = peak_rss_mb()
    (args.work / f"{name}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row), flush=True)


def stage_method(args):
    name = args.method
    cfg = METHODS[name]
    if cfg["kind"] == "detector":
        return stage_detector(args, name, cfg)
    torch.manual_seed(SEED)
    info = json.loads((args.work / "extract.json").read_text())
    strides = info["strides"]
    train = load_maps(args.work, "train")
    row = {"method": name, "n_train": len(train[0])}
    start = time.perf_counter()
    with torch.inference_mode():
        if cfg["kind"] == "protoad":
            network = fit_protoad(cfg, train, strides)
            row["n_prototypes"] = int(network.prototypes.shape[0])
            score = protoad_scorer(network, strides, cfg)
        elif cfg["kind"] == "patchcore":
            model = PatchCore(strides, (CROP, CROP), cfg["coreset_ratio"], seed=SEED)
            feats = torch.cat([model.patch_features(b) for b in batched(train)])
            model.fit(feats.reshape(-1, feats.shape[-1]))
            del feats
            row["memory_bank"] = int(model.memory_bank.shape[0])
            score = model
        else:
            n_channels = sum(info["channels"])
            model = PaDiM(strides, n_channels, (CROP, CROP), cfg["n_features"], seed=SEED)
            model.fit(batched(train))
            score = model
    row["own_fit_seconds"] = time.perf_counter() - start
    row["extract_seconds"] = info["train_seconds"]
    row["fit_seconds"] = row["own_fit_seconds"] + info["train_seconds"]
    row["peak_rss_fit_mb"] = peak_rss_mb()
    path = args.work / f"model_{name}"
    if cfg["kind"] == "protoad":
        save_protoad(network, path)
    else:
        backbone = create_feature_extractor(BACKBONE, LAYERS)
        torch.save({"backbone": backbone.state_dict(), "model": model.state_dict()}, path)
    row["model_mb"] = path.stat().st_size / 2**20
    del train

    data, _ = splits(args)
    test = load_maps(args.work, "test")
    if cfg["kind"] == "protoad" and cfg.get("neighbourhood", 1) == 1:
        row["max_abs_diff_vs_estimator"] = check_protoad_matches_estimator(
            network, data.test_paths, test, strides
        )
    start = time.perf_counter()
    maps, scores = [], []
    with torch.inference_mode():
        for b in batched(test):
            m, s = score(b)
            maps.append(m.numpy())
            scores.append(s.numpy())
    row["test_seconds_from_features"] = time.perf_counter() - start
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    masks = load_masks(data.test_mask_paths, IMAGE_SIZE, CROP)
    row.update(evaluate_maps(data.test_labels, scores, masks, maps))
    row["peak_rss_mb"] = peak_rss_mb()
    (args.work / f"{name}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------ speed
def load_predictors(work, names):
    """Image batch -> (maps, scores) callables of the saved models."""
    import joblib

    predictors = {}
    for name in names:
        path = work / f"model_{name}"
        cfg = METHODS[name]
        if cfg["kind"] in ("detector", "protoad"):
            saved = joblib.load(path)  # a fitted detector, or a network (save_protoad)
            network = (saved.network_ if cfg["kind"] == "detector" else saved).eval()
            # a detector's network does it all, aggregation included
            if cfg["kind"] == "protoad" and cfg.get("neighbourhood", 1) > 1:
                backbone = network.embedding.backbone
                predictors[name] = _with_backbone(
                    backbone, protoad_scorer(network, backbone.strides, cfg))
            else:
                predictors[name] = network
            continue
        predictors[name] = _with_backbone(*_load_baseline(path, cfg))
    return predictors


def _load_baseline(path, cfg):
    """(backbone, head) of a saved PatchCore or PaDiM model, in eval mode."""
    saved = torch.load(path, weights_only=True)
    backbone = create_feature_extractor(BACKBONE, LAYERS, weights=None)
    backbone.load_state_dict(saved["backbone"])
    strides, channels = backbone.strides, sum(backbone.channels)
    if cfg["kind"] == "patchcore":
        model = PatchCore(strides, (CROP, CROP))
    else:
        model = PaDiM(strides, channels, (CROP, CROP), cfg["n_features"])
    for key in ("memory_bank", "mean", "inv_cov"):
        if key in saved["model"]:
            # the fitted buffers' shapes are only known now
            setattr(model, key, torch.empty_like(saved["model"][key]))
    model.load_state_dict(saved["model"])
    return backbone, model.eval()


def _with_backbone(backbone, head):
    def predict(batch):
        return head(normalise(batch, backbone))

    return predict


def _full_bank_patchcore(args, n_train_images):
    name = "patchcore_1pct"
    backbone, model = _load_baseline(args.work / f"model_{name}", METHODS[name])
    grid = (CROP // backbone.strides[0]) ** 2
    n_rows = int(round(0.01 * n_train_images * grid))
    rows = torch.randint(len(model.memory_bank), (n_rows,), generator=torch.Generator().manual_seed(0))
    model.memory_bank = model.memory_bank[rows].clone()
    return _with_backbone(backbone, model)


def stage_speed(args):
    data, _ = splits(args)
    names = [n for n in ORDER if (args.work / f"model_{n}").exists()]
    predictors = load_predictors(args.work, names)
    if "patchcore_1pct" in predictors:
        # PatchCore's cost grows with its memory bank, 1 % of the training
        # patches: time it also with the bank a fit on all training images
        # would have (rows drawn from the fitted bank: the speed depends on
        # the bank's size only, so no accuracy for this row)
        full = _full_bank_patchcore(args, len(data.train_paths))
        predictors["patchcore_1pct_full_bank"] = full
        names.append("patchcore_1pct_full_bank")
    pick = np.linspace(0, len(data.test_paths) - 1, SPEED_IMAGES).round().astype(int)
    # decoded, resized and cropped up front: the timings are the models' alone
    paths = [data.test_paths[i] for i in pick]
    images = torch.cat([batch for _, batch in model_inputs(paths, IMAGE_SIZE, CROP)])
    times = {n: {1: [], 16: []} for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            predictors[name](images[:16])
        for _ in range(args.repeats):
            for bs in (1, 16):
                for name in names:  # alternate, so that load changes hit all methods
                    start = time.perf_counter()
                    for s in range(0, len(images), bs):
                        predictors[name](images[s : s + bs])
                    times[name][bs].append(time.perf_counter() - start)
    rows = {}
    for name in names:
        rows[name] = {
            f"img_per_s_batch{bs}": len(images) / float(np.median(t))
            for bs, t in times[name].items()
        }
        rows[name]["raw_seconds"] = {str(bs): t for bs, t in times[name].items()}
    (args.work / "speed.json").write_text(json.dumps(
        {"n_images": len(images), "repeats": args.repeats, "threads": torch.get_num_threads(),
         "rows": rows}, indent=2))
    print(json.dumps(rows), flush=True)


# ------------------------------------------------------------------ report
COLS = [
    ("method", "method", None), ("image_auroc", "image AUROC", 3), ("pixel_auroc", "pixel AUROC", 3),
    ("aupro", "AUPRO@0.3", 3), ("fit_seconds", "fit s (incl. features)", 0),
    ("own_fit_seconds", "of which method s", 0), ("img_per_s_batch1", "img/s b1", 1),
    ("img_per_s_batch16", "img/s b16", 1), ("peak_rss_mb", "peak RSS MiB", 0),
    ("model_mb", "model MiB", 1),
]


def command_line(args):
    cmd = f"python benchmarks/bench_anchors.py --train-step {args.train_step} --repeats {args.repeats}"
    return cmd + (f" --test-step {args.test_step}" if args.test_step != 1 else "")


def stage_report(args):
    extract_info = json.loads((args.work / "extract.json").read_text())
    speed_path = args.work / "speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else {"rows": {}}
    rows = []
    for name in ORDER:
        path = args.work / f"{name}.json"
        if path.exists():
            row = json.loads(path.read_text())
            row.update({k: v for k, v in speed["rows"].get(name, {}).items() if k != "raw_seconds"})
            rows.append(row)
    for name, timing in speed["rows"].items():  # speed-only rows
        if name not in ORDER:
            rows.append({"method": name, **{k: v for k, v in timing.items() if k != "raw_seconds"}})
    out = args.out
    meta = {
        "command": command_line(args),
        "machine": _common.machine(),
        "backbone": BACKBONE, "layers": list(LAYERS), "image_size": IMAGE_SIZE, "crop": CROP,
        "train_step": args.train_step, "extract": extract_info,
        "speed": {k: v for k, v in speed.items() if k != "rows"},
    }
    _common.write_json(out / "anchors.json",
                       {"meta": meta, "rows": rows, "speed_raw": speed["rows"]})
    lines = [
        "# ProtoAD vs PatchCore vs PaDiM on magnetic_tile (efficientnet_lite0)", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']}. Train: every {args.train_step}th image of train/good "
        f"({extract_info['train_images']} images); test: all {extract_info['test_images']} test images. "
        f"Fit seconds include the training-feature extraction ({extract_info['train_seconds']:.0f} s, "
        "measured once, shared). img/s: inference incl. backbone on "
        f"{speed.get('n_images', '?')} pre-loaded test images, median of {speed.get('repeats', '?')} "
        "repetitions, methods alternated. Peak RSS: ru_maxrss of the method's own subprocess "
        "(fit from cached stage maps + scoring the test set). See docs/benchmarks_anchors.md.", "",
        "| " + " | ".join(c[1] for c in COLS) + " |", "|" + "---|" * len(COLS),
    ]
    for r in rows:
        cells = []
        for key, _, digits in COLS:
            v = r.get(key, "")
            cells.append(f"{v:.{digits}f}" if digits is not None and v != "" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    _common.write_markdown(out / "anchors.md", lines)
    panels = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
              ("aupro", "AUPRO@0.3"), ("img_per_s_batch1", "img/s (batch 1)")]
    bar_chart(rows, panels, out / "anchors.png")
    print("\n".join(lines))


def bar_chart(rows, panels, path, panel_size=(300, 260)):
    """One bar panel per metric, methods side by side, drawn with PIL.

    matplotlib is not a dependency of the project; a plain chart with value
    labels is all the results page needs.
    """
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (174, 199, 232), (255, 127, 14), (44, 160, 44), (148, 103, 189)]
    pw, ph = panel_size
    legend_h = 18 * len(rows) + 10
    img = Image.new("RGB", (pw * len(panels), ph + legend_h), "white")
    draw = ImageDraw.Draw(img)
    top, bottom, left = 30, ph - 20, 20
    for p, (key, title) in enumerate(panels):
        x0 = p * pw
        draw.text((x0 + left, 8), title, fill="black")
        values = [float(r.get(key, 0) or 0) for r in rows]
        vmax = max(values + [1e-9])
        # AUROC-type metrics are shown on [0, 1]; speeds on [0, max]
        scale = 1.0 if key != "img_per_s_batch1" and vmax <= 1 else vmax * 1.1
        bar_w = (pw - 2 * left) // max(1, len(rows))
        draw.line((x0 + left, bottom, x0 + pw - left, bottom), fill="black")
        if scale == 1.0:  # chance level of the AUROC-type metrics
            y_half = bottom - (bottom - top) * 0.5
            draw.line((x0 + left, y_half, x0 + pw - left, y_half), fill=(160, 160, 160))
        for i, v in enumerate(values):
            bx = x0 + left + i * bar_w + 4
            by = bottom - (bottom - top) * v / scale
            draw.rectangle((bx, by, bx + bar_w - 8, bottom), fill=colours[i % len(colours)])
            draw.text((bx, by - 12), f"{v:.3g}", fill="black")
    for i, r in enumerate(rows):
        y = ph + 5 + 18 * i
        draw.rectangle((left, y, left + 12, y + 12), fill=colours[i % len(colours)])
        draw.text((left + 18, y), r["method"], fill="black")
    img.save(path)


def run_stage(args, stage, *extra):
    cmd = [sys.executable, __file__, "--stage", stage, "--data", str(args.data),
           "--work", str(args.work), "--out", str(args.out), "--train-step", str(args.train_step),
           "--repeats", str(args.repeats), "--test-step", str(args.test_step), *extra]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="all",
                        choices=["all", "extract", "method", "speed", "report"])
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--methods", nargs="+", default=ORDER, choices=list(METHODS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--train-step", type=int, default=4)
    parser.add_argument("--test-step", type=int, default=1,
                        help="every n-th test image only (smoke tests)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"data not found: {args.data}")
    stages = {"extract": stage_extract, "method": stage_method, "speed": stage_speed,
              "report": stage_report}
    if args.stage != "all":
        return stages[args.stage](args)
    run_stage(args, "extract")
    for name in args.methods:
        run_stage(args, "method", "--method", name)
    run_stage(args, "speed")
    run_stage(args, "report")


if __name__ == "__main__":
    main()
