"""The 3 x 3 aggregation on some backbone stages only, or beside the stages
as they are, on the real-data suite (leads, not taken).

    python benchmarks/bench_stage_aggregation.py [--sets NAME ...]
        [--variants NAME ...] [--seeds 0] [--max-train 200]

The defaults average every stage's features over a 3 x 3 neighbourhood
(``neighborhood_size=3``) before the join. Without it (``neighborhood_size=1``)
Magnetic Tile's and the objects' images rank better and the maps and the
textures worse (docs/user_guide/defaults.md). The issue that set up the suite
proposed an aggregation chosen per stage; this runs the defaults with the
3 x 3 average on a subset of the stages and none on the others (the
package offers one size for all stages):

- ``stage1``: the finest stage only (stride 4: a neighbourhood of 12 pixels);
- ``stages12``: stages 1 and 2;
- ``stage3``: the coarsest only (stride 16: 48 pixels);
- ``stages23``: stages 2 and 3;
- ``sizes13``: every stage twice, as it is and averaged over 3 x 3, the two
  joined side by side (352 channels instead of 176: the issue's "several
  neighbourhood sizes in the features").

:class:`skprotoad.network.PatchEmbedding`'s ``stage_maps`` is wrapped for
the run (its own aggregation off, then the chosen stages averaged; for
``sizes13`` its ``join`` and the network's scoring through the joined
features);
``bench_suite.run_one`` does the rest, so ``all`` is the suite's
``defaults`` row. Results: ``benchmarks/results/stage_aggregation.{json,md}``.
"""

import contextlib

import _common  # first: this checkout's skprotoad

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_suite  # noqa: E402

from skprotoad.network import PatchEmbedding, ProtoADNetwork  # noqa: E402

#: variant -> the stages (1-based, as ``layers``) whose features are averaged
VARIANTS = {
    "all": (1, 2, 3),
    "stage1": (1,),
    "stages12": (1, 2),
    "stage3": (3,),
    "stages23": (2, 3),
    "sizes13": None,
}
#: variant -> the neighbourhood sizes whose averages are joined side by side
CONCATENATED = {"sizes13": (1, 3)}
METRICS = ("crop_image_auroc", "crop_pixel_auroc", "crop_aupro")


@contextlib.contextmanager
def aggregated_stages(stages):
    """PatchEmbedding averages only ``stages`` (positions in its backbone's
    stage list, 1-based) over its ``neighborhood_size``; zero padding only."""
    original = PatchEmbedding.stage_maps

    def stage_maps(self, images):
        maps = _unaveraged(self, images, original)
        return [_average([m], self.neighborhood_size)[0] if i + 1 in stages else m
                for i, m in enumerate(maps)]

    PatchEmbedding.stage_maps = stage_maps
    try:
        yield
    finally:
        PatchEmbedding.stage_maps = original


def _unaveraged(embedding, images, stage_maps):
    """``stage_maps(embedding, images)`` with the embedding's own average off."""
    if embedding.padding != "zeros":
        raise ValueError("bench_stage_aggregation runs the defaults' zero padding only")
    size, embedding.neighborhood_size = embedding.neighborhood_size, 1
    try:
        return stage_maps(embedding, images)
    finally:
        embedding.neighborhood_size = size


def _average(maps, size):
    if size == 1:
        return maps
    return [F.avg_pool2d(m, size, stride=1, padding=size // 2, count_include_pad=False)
            for m in maps]


@contextlib.contextmanager
def concatenated_sizes(sizes):
    """PatchEmbedding joins every stage once per neighbourhood size in
    ``sizes``; the network scores through the joined features, since its
    stage-wise products on the CPU assume one copy of each stage."""
    init, join = PatchEmbedding.__init__, PatchEmbedding.join
    scoring = ProtoADNetwork.image_patch_scores

    def wide_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.n_channels = sum(self.backbone.channels) * len(sizes)

    def wide_join(self, images):
        maps = _unaveraged(self, images, PatchEmbedding.stage_maps)
        return torch.cat([part for s in sizes for part in self.at_finest_stride(_average(maps, s))],
                         dim=1)

    def joined_scoring(self, images):
        return self.patch_scores(self.embedding(images))

    PatchEmbedding.__init__, PatchEmbedding.join = wide_init, wide_join
    ProtoADNetwork.image_patch_scores = joined_scoring
    try:
        yield
    finally:
        PatchEmbedding.__init__, PatchEmbedding.join = init, join
        ProtoADNetwork.image_patch_scores = scoring


def main(argv=None):
    args, path, results = bench_suite.variant_run(__doc__, VARIANTS, "bench_stage_aggregation.py", "stage_aggregation", argv)
    for name, folder in bench_suite.find_sets(args.sets).items():
        data = bench_suite._Set(name, folder, args.max_train)
        for variant in args.variants:
            for seed in args.seeds:
                context = (concatenated_sizes(CONCATENATED[variant]) if variant in CONCATENATED
                           else aggregated_stages(VARIANTS[variant]))
                with context:
                    row = bench_suite.run_one(data, "defaults", seed, None)
                row = {"set": name, "variant": variant, "seed": seed, "n_train": data.n_train,
                       **{k: row[k] for k in (*METRICS, "fpr", "tpr")}}
                bench_suite.record_run(
                    results, path, f"{name}|{variant}|{seed}|{data.n_train}", row,
                    lambda results: _write_markdown(results, args.out / "stage_aggregation.md"))


def _write_markdown(results, path):
    cells = {}
    for r in results["runs"].values():
        cells.setdefault((r["set"], r["variant"]), []).append(r)
    variants = [v for v in VARIANTS if any(v == key[1] for key in cells)]
    names = sorted({key[0] for key in cells})
    rows, means = [], {v: [] for v in variants}
    for name in names:
        row = [name]
        for v in variants:
            got = cells.get((name, v), [])
            if not got:
                row.append("")
                continue
            mean = [sum(r[k] for r in got) / len(got) for k in METRICS]
            means[v].append(mean)
            row.append(" / ".join(f"{m:.3f}" for m in mean))
        rows.append(row)
    complete = [v for v in variants if len(means[v]) == len(names)]
    rows.append([f"mean of {len(names)}"] + [
        " / ".join(f"{sum(m[i] for m in means[v]) / len(names):.3f}" for i in range(3))
        if v in complete else "" for v in variants])
    bench_suite.write_variant_markdown(
        path, "The 3 x 3 aggregation on some stages only, or beside the stages as they are "
        "(leads, not taken)", results,
        "The default detector (efficientnet_lite0 stages 1-3, whole image at 256 x 256) with "
        "its 3 x 3 neighbourhood average on the listed stages only (`all`: the defaults), or "
        "(`sizes13`) every stage both as it is and averaged, joined side by side; "
        "seeded training subsets as in bench_suite. Each cell: image AUROC / pixel AUROC / "
        "AUPRO@0.3, mean over the seeds run.",
        ["set", *variants], rows)


if __name__ == "__main__":
    main()
