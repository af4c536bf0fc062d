"""Speed of the defaults against the bare backbone, PaDiM and PatchCore, side by side.

Everything in one process, on the same backbone (efficientnet_lite0, stages
1-3, bundled weights), the same images and the defaults' geometry (the whole
image at 256 x 256):

- ``backbone``: the bare backbone (its stage maps, no join), as PaDiM and
  PatchCore receive it;
- ``backbone + join``: the defaults' patch embedding (3 x 3 aggregation,
  join at stride 4, per-image normalisation): the physical limit of ProtoAD;
- ``defaults``: the fitted ``ProtoADDetector()`` network (on the CPU: the
  coarsest stage's products with the prototypes at its own stride); the
  same with its head on the joined stages in bands of patches (the way
  before); with that head in one piece (as exports run it); the same
  prototypes with the map in the plain metric (``map_metric="euclidean"``);
  with the image score half-way to the whitened metric (``score_whitening=0.5``);
  and the same network with K random prototypes (250 to 4,000; speed only);
- ``PaDiM`` (100 random dimensions) and ``PatchCore`` (1 % coreset) from
  ``benchmarks/anchors.py``, fitted on the same training images.

Inference: the test images are decoded and resized up front; each method runs
them at batch 1 and 16, the methods alternating within each round, and the
fastest round is kept. Then ``score_samples`` of the fitted detector on the
test image files (decoding, resizing and the detector's own work included),
at batch 1 and 16 and with one call per file (an inspection station's way).
Fit: seconds of ``ProtoADDetector().fit`` (features, the clusterings,
calibration) and of PaDiM's and PatchCore's fits including their backbone
pass, on the same images. Then the fit's clusterings side by side with a
first-neighbour search each and with one shared search (the fit's way),
and the speed of the clustering's matrix products by ``@`` and as a 1 x 1
convolution (the fit's way on the CPU).

    python benchmarks/bench_speed.py [--n-train 60] [--rounds 3] [--out DIR]

Writes DIR/speed.{json,md} (default benchmarks/results). Run it alone on the
machine: it measures time.
"""
import argparse
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anchors import PaDiM, PatchCore  # noqa: E402
from bench_anchors import normalise  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.backbones import create_feature_extractor  # noqa: E402
from skprotoad.clustering import (  # noqa: E402
    SharedSearch, first_neighbors, learn_prototypes, neighbors_without)
from skprotoad.datasets import load_mvtec, make_defect_dataset  # noqa: E402
from skprotoad.network import ProtoADNetwork  # noqa: E402
from skprotoad.preprocessing import model_inputs  # noqa: E402
from skprotoad.thresholds import calibration_folds  # noqa: E402

SIZE = 256
N_TEST = 32
KS = (250, 1000, 2000, 4000)


def load_data(n_train, n_test=N_TEST):
    """(name, training images, test images, test labels): evenly spaced ones
    of Magnetic Tile, or generated textures without the shared data."""
    folder = _common.data_dir("magnetic_tile")
    if _common.is_mvtec_set(folder):
        data = load_mvtec(folder)
        pick = np.linspace(0, len(data.train_paths) - 1, n_train).round().astype(int)
        tpick = np.linspace(0, len(data.test_paths) - 1, n_test).round().astype(int)
        return ("magnetic_tile", [data.train_paths[i] for i in pick],
                [data.test_paths[i] for i in tpick], np.asarray(data.test_labels)[tpick])
    data = make_defect_dataset(n_train=n_train, n_test=n_test, image_size=SIZE, random_state=0)
    return "synthetic_textures", data.X_train, data.X_test, np.asarray(data.y_test)


def _tensors(images):
    return torch.cat([batch for _, batch in model_inputs(images, SIZE, None, 16)])


def _fit_peers(extractor, train):
    """PaDiM and PatchCore fitted on ``train``, and their fit seconds."""
    channels = sum(extractor.channels)
    seconds = {}
    with torch.inference_mode():
        start = time.perf_counter()
        maps = [normalise(b, extractor) for _, b in model_inputs(train, SIZE, None, 16)]
        features_seconds = time.perf_counter() - start
        start = time.perf_counter()
        padim = PaDiM(extractor.strides, channels, (SIZE, SIZE), 100).fit(maps).eval()
        seconds["PaDiM"] = features_seconds + time.perf_counter() - start
        start = time.perf_counter()
        patchcore = PatchCore(extractor.strides, (SIZE, SIZE))
        rows = torch.cat([patchcore.patch_features(m).reshape(-1, channels) for m in maps])
        patchcore = patchcore.fit(rows).eval()
        seconds["PatchCore 1 %"] = features_seconds + time.perf_counter() - start
    return padim, patchcore, seconds


def _patch_rows(network, train, folds):
    """The network's patch features of ``train``, one row per patch, the
    images in the fit's order: ``folds``' held-out images last, the first
    fold's at the end (so that each fold is a trailing block of rows)."""
    order = [*folds[0][0], *folds[0][1]]
    images = [train[i] for i in order]
    with torch.inference_mode():
        maps = [network.embedding(b) for _, b in model_inputs(images, SIZE, None, 16)]
    return torch.cat(maps).permute(0, 2, 3, 1).reshape(-1, maps[0].shape[1]).numpy()


#: How the clusterings without each fold find their first neighbours:
#: ``(shared, lists)``: start from one search of all patches; search the rows
#: that lost their neighbour in that search's lists and start FINCH's second
#: level from the first clustering's (:class:`SharedSearch`, the fit's way),
#: else, when they are many, search all rows again.
CLUSTERING_WAYS = {
    "a search each": (False, False),
    "one shared search": (True, True),  # the fit's way
    "shared, all again when many": (True, False),  # the fit's way before the lists
}


def _clustering_seconds(X, folds, ways=("a search each", "one shared search")):
    """Seconds of the fit's clusterings (all training images, then without
    each of ``folds``) in each of ``ways`` (:data:`CLUSTERING_WAYS`), by the
    public clustering functions on patch features ``X`` from
    :func:`_patch_rows` (no farthest rows: the same work in all)."""
    per_image = len(X) // (len(folds[0][0]) + len(folds[0][1]))
    size = len(folds[0][1]) * per_image
    blocks = [(len(X) - (j + 1) * size, len(X) - j * size) for j in range(len(folds))]
    result = {"patches": len(X), "clusterings": 1 + len(blocks)}
    for way in ways:
        shared, with_lists = CLUSTERING_WAYS[way]
        start = time.perf_counter()
        if not shared:
            learn_prototypes(X, random_state=0)
            for a, b in blocks:
                learn_prototypes(np.delete(X, np.s_[a:b], axis=0), random_state=0)
            result[way] = time.perf_counter() - start
            continue
        if with_lists:  # the fit's way: first and second FINCH levels shared
            search = SharedSearch.of(X, random_state=0)
            neighbors = search.indices
            search.learn_prototypes(X, random_state=0)
        else:
            neighbors = first_neighbors(X, random_state=0)[0]
            learn_prototypes(X, random_state=0, first_neighbors=neighbors)
        searched_again = []
        for a, b in blocks:
            kept = neighbors_without(neighbors, a, b)
            searched_again.append(float(np.mean(kept < 0)))
            rest = np.delete(X, np.s_[a:b], axis=0)
            if with_lists:
                search.without(a, b).learn_prototypes(rest, random_state=0)
            else:
                learn_prototypes(rest, random_state=0, first_neighbors=kept)
        result[way] = time.perf_counter() - start
        result["searched again"] = searched_again
        result["neighbour in own image"] = float(
            np.mean(neighbors // per_image == np.arange(len(X)) // per_image))
    return result


def _product_speed(rounds=5):
    """Multiply-adds per second (G) of ``A @ B.T`` for the clustering's
    shapes (8,192 rows of 176 channels against K rows), by ``@`` (sgemm) and
    as a 1 x 1 convolution of a channels-last view of ``A`` (oneDNN)."""
    rng = torch.Generator().manual_seed(0)
    speed = {}
    for k in (1000, 2000, 8192):
        A, B = torch.randn(8192, 176, generator=rng), torch.randn(k, 176, generator=rng)
        ways = {
            "@": lambda: A @ B.T,
            "1 x 1 conv": lambda: torch.nn.functional.conv2d(
                A.view(1, 8192, 1, 176).permute(0, 3, 1, 2), B[:, :, None, None]),
        }
        for way, fn in ways.items():
            fn()
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            speed[f"K={k}, {way}"] = 8192 * k * 176 / best / 1e9
    return speed


def throughput(methods, images, rounds):
    """Images per second of each method at batch 1 and 16 (fastest round).

    Each method is called on ``images[s:s + batch]``; the methods alternate
    within each round, so that a change of load hits them all alike.
    """
    best = {name: {1: float("inf"), 16: float("inf")} for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn(images[:16])
        for _ in range(rounds):
            for bs in (1, 16):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    for s in range(0, len(images), bs):
                        fn(images[s:s + bs])
                    best[name][bs] = min(best[name][bs], time.perf_counter() - start)
    return {name: {bs: len(images) / t for bs, t in b.items()} for name, b in best.items()}


def file_throughput(det, paths, rounds):
    """Images per second of ``det.score_samples`` on image files (decoding,
    resizing and the detector's own work included), at batch 1 and 16, and
    with one call per image (``"per call"``: an inspection station's way)."""
    if not all(isinstance(p, (str, Path)) for p in paths):
        return {}
    best = {1: float("inf"), 16: float("inf"), "per call": float("inf")}
    batch_size = det.batch_size
    try:
        det.score_samples(paths[:16])  # warm-up
        for _ in range(rounds):
            for bs in (1, 16):
                det.set_params(batch_size=bs)
                start = time.perf_counter()
                det.score_samples(paths)
                best[bs] = min(best[bs], time.perf_counter() - start)
            start = time.perf_counter()
            for path in paths:
                det.score_samples([path])
            best["per call"] = min(best["per call"], time.perf_counter() - start)
    finally:
        det.set_params(batch_size=batch_size)
    return {"defaults on files": {bs: len(paths) / t for bs, t in best.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    name, train, test, _ = load_data(args.n_train)
    fit_seconds = {}
    start = time.perf_counter()
    det = ProtoADDetector(random_state=0).fit(train)
    fit_seconds["defaults"] = time.perf_counter() - start
    stage_seconds = dict(det.fit_seconds_)
    extractor = create_feature_extractor("efficientnet_lite0", (1, 2, 3)).eval()
    padim, patchcore, peer_seconds = _fit_peers(extractor, train)
    fit_seconds.update(peer_seconds)
    network = det.network_.eval()
    embedding = network.embedding
    baseline = network.score_baseline if network.score_baseline.numel() else None
    whitening = network.map_whitening if network.map_whitening.numel() else None
    network_name = f"defaults ({network.prototypes.shape[0]} prototypes)"
    methods = {
        "backbone": lambda x: normalise(x, extractor),
        "backbone + join": embedding,
        network_name: network,
        # the head on the joined stages (the CPU's way before the stage-wise
        # products), in bands of patches
        "defaults, joined head": lambda x: network.head(embedding(x)),
        # the head as exports run it (and as it ran before the bands): one
        # conv over all patches of the batch
        "defaults, head in one piece": lambda x: network.readout(*network._patch_scores(
            embedding(x).contiguous(memory_format=torch.channels_last))),
        # the same prototypes, the map in the plain metric (map_metric="euclidean")
        "defaults, euclidean map": ProtoADNetwork(
            embedding, network.prototypes.detach().clone(), (SIZE, SIZE),
            image_score=network.image_score, score_baseline=baseline).eval(),
        # the same network, the image score half-way to the whitened metric
        "defaults, score_whitening=0.5": ProtoADNetwork(
            embedding, network.prototypes.detach().clone(), (SIZE, SIZE),
            image_score=network.image_score, score_baseline=baseline,
            map_whitening=whitening, score_whitening=0.5).eval(),
    }
    for k in KS:
        methods[f"defaults, {k} random prototypes"] = ProtoADNetwork(
            embedding, torch.randn(k, embedding.n_channels), (SIZE, SIZE),
            image_score=network.image_score, score_baseline=baseline,
            map_whitening=whitening, score_whitening=network.score_whitening).eval()
    methods["PaDiM"] = lambda x: padim(normalise(x, extractor))
    methods["PatchCore 1 %"] = lambda x: patchcore(normalise(x, extractor))
    speed = throughput(methods, _tensors(test), args.rounds)
    speed.update(file_throughput(det, test, args.rounds))
    folds = calibration_folds(len(train), 0)
    clusterings = _clustering_seconds(_patch_rows(network, train, folds), folds)
    products = _product_speed()
    command = (f"python benchmarks/bench_speed.py --n-train {args.n_train} "
               f"--rounds {args.rounds}")
    if args.out.resolve() != _common.RESULTS.resolve():
        command += f" --out {args.out}"
    result = {"command": command, "machine": _common.machine(), "data": name,
              "n_train": len(train), "n_test": N_TEST, "threads": torch.get_num_threads(),
              "images_per_second": speed, "fit_seconds": fit_seconds,
              "defaults_fit_seconds_by_stage": stage_seconds,
              "clustering_seconds": clusterings, "products_gmacs": products,
              "patchcore_bank": int(patchcore.memory_bank.shape[0])}
    _common.write_json(args.out / "speed.json", result)
    limit = speed["backbone + join"]
    padim_speed = speed["PaDiM"]
    rows = [[m, f"{s[1]:.1f}", f"{s[16]:.1f}", f"{limit[1] / s[1]:.2f}x",
             f"{limit[16] / s[16]:.2f}x", f"{s[1] / padim_speed[1]:.2f}x",
             f"{s[16] / padim_speed[16]:.2f}x"] for m, s in speed.items()]
    lines = [
        "# Speed: the defaults, the backbone, PaDiM and PatchCore", "",
        f"Command: `{command}`", "",
        f"Machine: {result['machine']}, {result['threads']} threads. {len(train)} {name} "
        f"training images, {N_TEST} test images, whole image at {SIZE} x {SIZE}, "
        "efficientnet_lite0 stages 1-3; images decoded and resized beforehand (except "
        "the rows 'on files': the detector's `score_samples` on the image files); fastest of "
        f"{args.rounds} rounds, methods alternating. Cost: the time per image over "
        "`backbone + join`'s (the limit of a ProtoAD network); speed: images/s over PaDiM's.",
        "",
        *_common.markdown_table(
            ["method", "img/s batch 1", "img/s batch 16", "cost b1", "cost b16",
             "speed vs PaDiM b1", "speed vs PaDiM b16"], rows),
        "",
        "Fit seconds on the same images (features included): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in fit_seconds.items())
        + f" (defaults / PaDiM: {fit_seconds['defaults'] / fit_seconds['PaDiM']:.1f}x; "
        f"PatchCore's bank: {result['patchcore_bank']} patches). The defaults' fit by "
        "stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in stage_seconds.items()
                              if k != "total") + ".",
    ]
    if "defaults on files" in speed:
        in_memory = speed[network_name]
        on_files = speed["defaults on files"]
        lines += ["", "Scoring files, decoding included: "
                  f"{on_files[1] / in_memory[1]:.0%} / {on_files[16] / in_memory[16]:.0%} of the "
                  "network's images/s on decoded images at batch 1 / 16; one `score_samples` "
                  f"call per file: {on_files['per call']:.1f} img/s, "
                  f"{on_files['per call'] / in_memory[1]:.0%} of the network's at batch 1."]
    c = clusterings
    lines += ["", f"The fit's {c['clusterings']} clusterings of {c['patches']:,} patches (all "
              "training images, then without each calibration fold; no farthest rows): "
              f"{c['a search each']:.1f} s with a first-neighbour search each, "
              f"{c['one shared search']:.1f} s with one search shared by all "
              f"({c['a search each'] / c['one shared search']:.2f}x). A patch's first neighbour "
              f"lay in its own image for {c['neighbour in own image']:.2%} of the patches; each "
              "clustering without a fold searched again for "
              + ", ".join(f"{v:.3%}" for v in c["searched again"]) + " of its patches.",
              "", "Products `A @ B.T` of 8,192 rows of 176 channels against K rows, "
              "G multiply-adds/s: " + ", ".join(f"{k} {v:.0f}" for k, v in products.items())
              + "."]
    _common.write_markdown(args.out / "speed.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
