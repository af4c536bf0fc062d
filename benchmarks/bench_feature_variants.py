"""Feature variants on magnetic_tile, one factor at a time; features extracted once.

Backbone stage maps (efficientnet_lite0, stages 1..3, resize 256 / crop 224) of
every 4th training image and of all test images are computed once; each
variant then builds its patch embedding from them, learns k-means prototypes,
and scores the test set (receptive-field-centred upsampling, Gaussian sigma 4).

    python benchmarks/bench_feature_variants.py [VARIANT ...] [--list]

Writes benchmarks/results/feature_variants.{json,md}. Data: Y. Huang, C. Qiu,
K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer 36,
85-96 (2020).
"""
import argparse
from pathlib import Path

import _common  # first: this checkout's skprotoad
import time, json, numpy as np, scipy.sparse as sp, torch, torch.nn.functional as F
from skprotoad.backbones import create_feature_extractor
from skprotoad.preprocessing import model_inputs
from skprotoad.network import upsample, GaussianSmoothing, IMAGENET_MEAN, IMAGENET_STD
from skprotoad.datasets import load_mvtec, load_masks
from skprotoad.metrics import evaluate_maps
from skprotoad.clustering import learn_prototypes, finch_n_clusters, kmeans
from anchors import greedy_coreset


def kmeans_labels(X, K, block=65536):
    """Labels of the closest (cosine) of K k-means centres of the unit rows X."""
    C = torch.from_numpy(kmeans(X, K, random_state=0))
    Xt = torch.from_numpy(X)
    return torch.cat([(Xt[i:i + block] @ C.T).argmax(dim=1)
                      for i in range(0, len(Xt), block)]).numpy()


def cluster_sums(X, labels, n_clusters):
    """Per-cluster sums of the rows of ``X`` (float32, deterministic)."""
    n = X.shape[0]
    member = sp.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))),
                           shape=(n_clusters, n))
    return np.asarray(member @ X, dtype=np.float32)


ROWS = []
mean = torch.tensor(IMAGENET_MEAN).view(1,3,1,1); std = torch.tensor(IMAGENET_STD).view(1,3,1,1)
def stage_maps(paths):
    out = [[], [], []]
    with torch.inference_mode():
        for _, b in model_inputs(paths, 256, 224, batch_size=32):
            for k, m in enumerate(fe((b - mean) / std)): out[k].append(m)
    return [torch.cat(o) for o in out]


def prepare(out):
    """The data, the backbone and the stage maps every variant reads (module
    globals, as the variants below were written against them)."""
    global RESULTS, data, train, fe, tr, te, masks
    RESULTS = out
    data = load_mvtec(_common.data_dir('magnetic_tile'))
    train = data.train_paths[::4]
    fe = create_feature_extractor('efficientnet_lite0', (1, 2, 3))
    t = time.time(); tr = stage_maps(train); te = stage_maps(data.test_paths); print('extract', time.time() - t, flush=True)
    masks = load_masks(data.test_mask_paths, 256, 224)


def embed(maps, agg, per_stage, stages, weights=None, pos=0.0, whiten=None, normalize=True):
    parts = []
    for i, k in enumerate(stages):
        m = maps[k]
        if agg: m = F.avg_pool2d(m, agg, stride=1, padding=agg // 2, count_include_pad=False)
        if per_stage: m = F.normalize(m, dim=1)
        if weights is not None: m = m * weights[i]
        s = fe.strides[k] // fe.strides[stages[0]]
        parts.append(m if s == 1 else upsample(m, s, tuple(maps[stages[0]].shape[-2:]), 'center'))
    f = torch.cat(parts, 1)
    if whiten is not None:
        # a 1x1 conv before the normalisation: x -> W (x - mu), W = (Cov + eps I)^-1/2
        # of the normal features, so that cosine similarity weighs directions like
        # a Mahalanobis distance (PaDiM's, but one for all positions)
        mu, W = whiten
        f = torch.einsum('dc,nchw->ndhw', W, f - mu.view(1, -1, 1, 1))
    if normalize == 'image':
        # one scale per image (its mean patch norm): the image's contrast goes,
        # the patches' relative magnitudes stay
        return f / f.norm(dim=1, keepdim=True).mean((2, 3), keepdim=True)
    if normalize == 'image_rms':  # the same with the root mean square norm
        return f / (f * f).sum(1, keepdim=True).mean((2, 3), keepdim=True).sqrt()
    if not normalize:
        return f
    f = F.normalize(f, dim=1)
    if pos:
        # patch position as two extra channels in [-pos, pos]: lets a prototype
        # stand for "this texture at this place" (PaDiM models every position)
        n, _, h, w = f.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing='ij')
        grid = pos * torch.stack([yy, xx]).expand(n, 2, h, w)
        f = F.normalize(torch.cat([f, grid], 1), dim=1)
    return f


def run(name, agg=0, per_stage=False, stages=(0, 1, 2), K=500, score='max', method='kmeans',
        sigma=4.0, weights=None, pos=0.0, train_step=1, neighbors='auto', whiten=0.0,
        posnorm=None, metric='cosine'):
    t = time.time()
    raw = metric in ('euclidean', 'image', 'image_rms')
    norm_arg = metric if metric.startswith('image') else not raw
    train_maps = tr
    if posnorm in ('mean', 'z'):
        # every 5th training image is held out: its maps give the normal map
        # statistics per pixel position
        calib = [m[::5] for m in tr]
        train_maps = [torch.cat([m[i::5] for i in range(1, 5)]) for m in tr]
    smooth = GaussianSmoothing(sigma, (224, 224))
    stats = None
    if whiten:
        unwhitened = embed([m[::train_step] for m in train_maps], agg, per_stage, stages, weights, 0.0)
        unwhitened = unwhitened.permute(0, 2, 3, 1).reshape(-1, unwhitened.shape[1]).double()
        mu = unwhitened.mean(0)
        cov = torch.cov((unwhitened - mu).T)
        eigval, eigvec = torch.linalg.eigh(cov)
        eps = whiten * eigval.mean()
        W = (eigvec @ torch.diag((eigval + eps) ** -0.5) @ eigvec.T).float()
        stats = (mu.float(), W)
        del unwhitened
    ftr = embed([m[::train_step] for m in train_maps], agg, per_stage, stages, weights, pos, stats,
                normalize=norm_arg)
    X = ftr.permute(0, 2, 3, 1).reshape(-1, ftr.shape[1]).contiguous()
    if method == 'coreset':
        # PatchCore's greedy k-center selection, in the space the metric measures
        P = X[greedy_coreset(X, K, 128, 0)].clone()
    elif raw:
        # cluster the directions (as the default does), keep the raw means:
        # prototypes that carry the feature magnitude too
        labels = finch_n_clusters(F.normalize(X, dim=1).numpy(), K, random_state=0) if method == 'finch' \
            else kmeans_labels(F.normalize(X, dim=1).numpy(), K)
        P = torch.from_numpy(cluster_sums(X.numpy(), labels, int(labels.max()) + 1))
        P /= torch.from_numpy(np.bincount(labels)).float()[:, None]
    else:
        P = torch.from_numpy(learn_prototypes(X.numpy(), method=method, n_clusters=K, random_state=0,
                                              neighbors=neighbors))
    P_sq = (P * P).sum(1)
    t_cluster = time.time() - t
    def score_maps(source, readout=None):
        """Maps of ``source``; ``readout="cosine"``: 1 - max cosine to the same
        prototypes, whatever the metric (an image score from another readout)."""
        maps = []
        with torch.inference_mode():
            for i in range(0, len(source[0]), 32):
                f = embed([m[i:i+32] for m in source], agg, per_stage, stages, weights, pos, stats,
                          normalize=norm_arg)
                if readout == 'cosine':
                    ps = 1 - torch.einsum('nchw,kc->nkhw', F.normalize(f, dim=1),
                                          F.normalize(P, dim=1)).amax(1, keepdim=True)
                elif raw:
                    # ||x - p||^2 = ||x||^2 - max_k (2 x.p_k - ||p_k||^2): still a 1x1 conv (with bias) + max
                    best = (2 * torch.einsum('nchw,kc->nkhw', f, P) - P_sq.view(1, -1, 1, 1)).amax(1, keepdim=True)
                    ps = ((f * f).sum(1, keepdim=True) - best).clamp_min(0).sqrt()
                else:
                    ps = 1 - torch.einsum('nchw,kc->nkhw', f, P).amax(1, keepdim=True)
                mp = upsample(ps, fe.strides[stages[0]], (224, 224), 'center')[:, 0]
                maps.append(smooth(mp) if sigma else mp)
        return torch.cat(maps).numpy()
    maps = score_maps(te)
    if posnorm:
        # held out, or (in-sample) the maps of the images the prototypes came from
        normal_maps = score_maps(calib if posnorm in ('mean', 'z') else
                                 [m[::train_step] for m in train_maps])
        mu = normal_maps.mean(0)
        maps = maps - mu if posnorm in ('mean', 'mean_insample') else (maps - mu) / (normal_maps.std(0) + 1e-3)
    flat = maps.reshape(len(maps), -1)
    if score == 'cosine':
        scores = score_maps(te, readout='cosine').reshape(len(maps), -1).max(1)
    elif score == 'max':
        scores = flat.max(1)
    else:
        scores = np.sort(flat, 1)[:, -int(score):].mean(1)
    # where the normal test images peak: share within 16 px of the crop's edge
    rows_, cols_ = np.unravel_index(flat.argmax(1), maps.shape[1:])
    edge = np.minimum.reduce([rows_, cols_, maps.shape[1] - 1 - rows_, maps.shape[2] - 1 - cols_]) < 16
    normal = data.test_labels == 0
    r = evaluate_maps(data.test_labels, scores, masks, maps)
    row = {'variant': name, 'neighborhood': agg or 1, 'per_stage_norm': per_stage,
           'stages': [s + 1 for s in stages], 'stage_weights': weights, 'position': pos,
           'whiten': whiten, 'position_norm': posnorm, 'metric': metric,
           'clustering': method if neighbors == 'auto' else f'{method} ({neighbors})',
           'n_train': len(ftr), 'n_prototypes': len(P), 'sigma': sigma, 'score': str(score),
           **{k: round(v, 4) for k, v in r.items()},
           'normal_max_at_edge': round(float(edge[normal].mean()), 3),
           'cluster_seconds': round(t_cluster),
           'seconds': round(time.time() - t)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    write()


def write():
    out = RESULTS
    path = out / 'feature_variants.json'
    # a partial run (named variants) keeps the other variants' earlier rows
    rows = {r['variant']: r for r in _common.read_json(path, [])}
    rows.update({r['variant']: r for r in ROWS})
    rows = list(rows.values())
    _common.write_json(path, rows)
    cols = ['variant', 'neighborhood', 'per_stage_norm', 'stages', 'stage_weights', 'position', 'whiten', 'position_norm', 'metric', 'clustering',
            'n_train', 'n_prototypes', 'sigma', 'score',
            'image_auroc', 'pixel_auroc', 'aupro', 'image_f1_max', 'pixel_f1_max', 'normal_max_at_edge']
    lines = ['# Feature variants on magnetic_tile (efficientnet_lite0)', '',
             'Command: `python benchmarks/bench_feature_variants.py`', '',
             f'Train: every 4th of train/good ({len(train)} images); test: all {len(data.test_paths)} test images.', '']
    lines += _common.markdown_table(cols, [[r.get(c, '') for c in cols] for r in rows])
    _common.write_markdown(out / 'feature_variants.md', lines)


# name -> keyword arguments of run()
VARIANTS = {
    'base': dict(),
    'agg3': dict(agg=3),
    'perstage': dict(per_stage=True),
    'agg3_perstage': dict(agg=3, per_stage=True),
    'agg3_perstage_top100': dict(agg=3, per_stage=True, score=100),
    'agg3_stages23': dict(agg=3, stages=(1, 2)),
    'agg3_perstage_K2000': dict(agg=3, per_stage=True, K=2000),
    'agg3_finch_1000': dict(agg=3, method='finch', K=1000),
    'agg3_kmeans_1000': dict(agg=3, K=1000),
    # second round (default: 3x3 aggregation, FINCH merged to 1,000)
    'finch1000_perstage': dict(agg=3, per_stage=True, method='finch', K=1000),
    'finch1000_pos0.25': dict(agg=3, method='finch', K=1000, pos=0.25),
    'finch1000_pos0.5': dict(agg=3, method='finch', K=1000, pos=0.5),
    'finch1000_sigma2': dict(agg=3, method='finch', K=1000, sigma=2.0),
    'finch1000_sigma8': dict(agg=3, method='finch', K=1000, sigma=8.0),
    'finch1000_top100': dict(agg=3, method='finch', K=1000, score=100),
    'finch1000_w1-1-2': dict(agg=3, per_stage=True, method='finch', K=1000, weights=(1, 1, 2)),
    'finch1000_w2-1-1': dict(agg=3, per_stage=True, method='finch', K=1000, weights=(2, 1, 1)),
    'finch250': dict(agg=3, method='finch', K=250),
    'finch500': dict(agg=3, method='finch', K=500),
    'finch2000': dict(agg=3, method='finch', K=2000),
    'finch4000': dict(agg=3, method='finch', K=4000),
    # exact vs approximate first neighbours, on every 4th of these images (150k patches)
    'finch1000_sub4_exact': dict(agg=3, method='finch', K=1000, train_step=4, neighbors='exact'),
    'finch1000_sub4_approx': dict(agg=3, method='finch', K=1000, train_step=4, neighbors='approx'),
    'finch1000_whiten0.01': dict(agg=3, method='finch', K=1000, whiten=0.01),
    'finch1000_whiten0.1': dict(agg=3, method='finch', K=1000, whiten=0.1),
    'finch1000_whiten1': dict(agg=3, method='finch', K=1000, whiten=1.0),
    'finch1000_posnorm_mean': dict(agg=3, method='finch', K=1000, posnorm='mean'),
    'finch1000_posnorm_z': dict(agg=3, method='finch', K=1000, posnorm='z'),
    'finch1000_posnorm_mean_insample': dict(agg=3, method='finch', K=1000, posnorm='mean_insample'),
    # third round: the distance PatchCore uses (Euclidean on raw, aggregated features)
    'finch1000_euclid': dict(agg=3, method='finch', K=1000, metric='euclidean'),
    'coreset1000_cosine': dict(agg=3, method='coreset', K=1000),
    'coreset1000_euclid': dict(agg=3, method='coreset', K=1000, metric='euclidean'),
    'kmeans1000_euclid': dict(agg=3, method='kmeans', K=1000, metric='euclidean'),
    'finch1000_imagenorm': dict(agg=3, method='finch', K=1000, metric='image'),
    'kmeans1000_imagenorm': dict(agg=3, method='kmeans', K=1000, metric='image'),
    'finch1000_imagenorm_rms': dict(agg=3, method='finch', K=1000, metric='image_rms'),
    'finch1000_imagenorm_top10': dict(agg=3, method='finch', K=1000, metric='image', score=10),
    'finch1000_imagenorm_top100': dict(agg=3, method='finch', K=1000, metric='image', score=100),
    'finch1000_imagenorm_top1000': dict(agg=3, method='finch', K=1000, metric='image', score=1000),
    # image score from the cosine readout of the same prototypes, map from the distances
    'finch1000_imagenorm_cosine_score': dict(agg=3, method='finch', K=1000, metric='image', score='cosine'),
}


def mean_norm_auroc():
    """How well an image's mean raw feature norm alone (3x3 aggregated stages,
    the crop) tells defective from normal test images: AUROC of minus the
    norm, weaker features = more anomalous."""
    from sklearn.metrics import roc_auc_score

    with torch.inference_mode():
        norms = np.concatenate([
            embed([m[i:i + 32] for m in te], 3, False, (0, 1, 2), normalize=False)
            .norm(dim=1).mean((1, 2)).numpy() for i in range(0, len(te[0]), 32)])
    row = {'variant': 'diagnostic_mean_feature_norm', 'metric': 'minus mean raw patch norm',
           'score': 'image only', 'image_auroc': round(float(roc_auc_score(data.test_labels, -norms)), 4)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    write()


DIAGNOSTIC = 'diagnostic_mean_feature_norm'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    chosen = _common.chosen_variants(parser, args, [*VARIANTS, DIAGNOSTIC])
    if chosen is None:
        return
    torch.set_num_threads(2)
    prepare(args.out)
    for name, kw in VARIANTS.items():
        if name in chosen:
            run(name, **kw)
    if DIAGNOSTIC in chosen:
        mean_norm_auroc()


if __name__ == "__main__":
    main()
