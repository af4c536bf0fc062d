"""Feature variants on magnetic_tile, one factor at a time; features extracted once.

Backbone stage maps (efficientnet_lite0, stages 1..3, resize 256 / crop 224) of
every 4th training image and of all test images are computed once; each
variant then builds its patch embedding from them, learns k-means prototypes,
and scores the test set (receptive-field-centred upsampling, Gaussian sigma 4).

    python benchmarks/bench_feature_variants.py [VARIANT ...]

Writes benchmarks/results/feature_variants.{json,md}. Data: Y. Huang, C. Qiu,
K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer 36,
85-96 (2020).
"""
import time, json, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(2)
from skprotoad._images import ImageSequence
from skprotoad.backbones import create_feature_extractor
from skprotoad.network import upsample, GaussianSmoothing, IMAGENET_MEAN, IMAGENET_STD
from skprotoad.datasets import load_mvtec, load_masks
from skprotoad.metrics import evaluate_maps
from skprotoad.clustering import learn_prototypes

from pathlib import Path
HERE = Path(__file__).resolve().parent
data = load_mvtec(HERE.parent.parent / 'shared' / 'data' / 'magnetic_tile')
ROWS = []
train = data.train_paths[::4]
fe = create_feature_extractor('efficientnet_lite0', (1, 2, 3))
mean = torch.tensor(IMAGENET_MEAN).view(1,3,1,1); std = torch.tensor(IMAGENET_STD).view(1,3,1,1)
def stage_maps(paths):
    seq = ImageSequence(paths); out = [[], [], []]
    with torch.inference_mode():
        for _, b in seq.batches(32, 256, 224):
            for k, m in enumerate(fe((b - mean) / std)): out[k].append(m)
    return [torch.cat(o) for o in out]
t = time.time(); tr = stage_maps(train); te = stage_maps(data.test_paths); print('extract', time.time() - t, flush=True)
masks = load_masks(data.test_mask_paths, 256, 224)
smooth = GaussianSmoothing(4.0, (224, 224))

def embed(maps, agg, per_stage, stages):
    parts = []
    for k in stages:
        m = maps[k]
        if agg: m = F.avg_pool2d(m, agg, stride=1, padding=agg // 2, count_include_pad=False)
        if per_stage: m = F.normalize(m, dim=1)
        s = fe.strides[k] // fe.strides[stages[0]]
        parts.append(m if s == 1 else upsample(m, s, tuple(maps[stages[0]].shape[-2:]), 'center'))
    return F.normalize(torch.cat(parts, 1), dim=1)

def run(name, agg=0, per_stage=False, stages=(0, 1, 2), K=500, score='max', method='kmeans'):
    t = time.time()
    ftr = embed(tr, agg, per_stage, stages)
    X = ftr.permute(0, 2, 3, 1).reshape(-1, ftr.shape[1]).numpy()
    P = torch.from_numpy(learn_prototypes(X, method=method, n_clusters=K, random_state=0))
    maps = []
    with torch.inference_mode():
        for i in range(0, len(te[0]), 32):
            f = embed([m[i:i+32] for m in te], agg, per_stage, stages)
            ps = 1 - torch.einsum('nchw,kc->nkhw', f, P).amax(1, keepdim=True)
            mp = smooth(upsample(ps, fe.strides[stages[0]], (224, 224), 'center')[:, 0])
            maps.append(mp)
    maps = torch.cat(maps).numpy()
    flat = maps.reshape(len(maps), -1)
    scores = flat.max(1) if score == 'max' else np.sort(flat, 1)[:, -int(score):].mean(1)
    r = evaluate_maps(data.test_labels, scores, masks, maps)
    row = {'variant': name, 'neighborhood': agg or 1, 'per_stage_norm': per_stage,
           'stages': [s + 1 for s in stages], 'clustering': method,
           'n_prototypes': len(P), 'score': str(score),
           **{k: round(v, 4) for k, v in r.items()}, 'seconds': round(time.time() - t)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    write()


def write():
    out = HERE / 'results'
    out.mkdir(exist_ok=True)
    path = out / 'feature_variants.json'
    # a partial run (named variants) keeps the other variants' earlier rows
    rows = {r['variant']: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    rows.update({r['variant']: r for r in ROWS})
    rows = list(rows.values())
    path.write_text(json.dumps(rows, indent=2))
    cols = ['variant', 'neighborhood', 'per_stage_norm', 'stages', 'clustering', 'n_prototypes', 'score',
            'image_auroc', 'pixel_auroc', 'aupro', 'image_f1_max', 'pixel_f1_max']
    lines = ['# Feature variants on magnetic_tile (efficientnet_lite0)', '',
             'Command: `python benchmarks/bench_feature_variants.py`', '',
             f'Train: every 4th of train/good ({len(train)} images); test: all {len(data.test_paths)} test images.', '',
             '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    lines += ['| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |' for r in rows]
    (out / 'feature_variants.md').write_text('\n'.join(lines) + '\n')

import sys
ONLY = sys.argv[1:]  # variant names to run; all when empty
_run = run
def run(name, **kw):
    if not ONLY or name in ONLY:
        _run(name, **kw)

run('base')
run('agg3', agg=3)
run('perstage', per_stage=True)
run('agg3_perstage', agg=3, per_stage=True)
run('agg3_perstage_top100', agg=3, per_stage=True, score=100)
run('agg3_stages23', agg=3, stages=(1, 2))
run('agg3_perstage_K2000', agg=3, per_stage=True, K=2000)
run('agg3_finch_1000', agg=3, method='finch', K=1000)
run('agg3_kmeans_1000', agg=3, K=1000)
