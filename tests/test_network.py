import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from skprotoad.backbones import create_feature_extractor
from skprotoad import network
from skprotoad.network import GaussianSmoothing, PatchEmbedding, ProtoADNetwork, upsample


@pytest.fixture(scope="module")
def embedding():
    return PatchEmbedding(create_feature_extractor("resnet18", (1, 2), weights=None))


@pytest.mark.parametrize("sigma", [0.7, 4.0, 9.0])
@pytest.mark.parametrize("size", [(31, 64), (12, 10)])
@pytest.mark.parametrize("n_maps", [1, 3])
def test_smoothing_matches_scipy(sigma, size, n_maps):
    maps = np.random.default_rng(0).random((n_maps, *size)).astype(np.float32)
    ours = GaussianSmoothing(sigma, size)(torch.from_numpy(maps)).numpy()
    for m, o in zip(maps, ours):
        ref = gaussian_filter(m.astype(np.float64), sigma=sigma, mode="reflect")
        np.testing.assert_allclose(o, ref, atol=1e-5)


def test_traced_smoothing_takes_any_batch_size():
    # eager CPU batches run as one depthwise conv; a trace must not fix the
    # batch size in the conv's groups
    smoothing = GaussianSmoothing(4.0, (20, 24))
    traced = torch.jit.trace(smoothing, torch.rand(2, 20, 24), check_trace=False)
    maps = torch.rand(5, 20, 24)
    torch.testing.assert_close(traced(maps), smoothing(maps), rtol=0, atol=1e-6)


def test_sigma_zero_is_identity():
    maps = torch.rand(1, 9, 9)
    assert torch.equal(GaussianSmoothing(0, (9, 9))(maps), maps)


def test_paper_join_repeats_coarse_features(embedding):
    paper = PatchEmbedding(embedding.backbone, alignment="paper")
    x = torch.rand(2, 3, 64, 64)
    features = paper(x)
    assert features.shape == (2, 64 + 128, 16, 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 16, 16))
    # each stride-8 feature is repeated over the 2 x 2 stride-4 patches it covers
    # (up to the joint normalisation, which scales each patch differently)
    layer2 = F.normalize(features[:, 64:], dim=1)
    torch.testing.assert_close(layer2[:, :, 0::2, 0::2], layer2[:, :, 1::2, 1::2])


def test_center_upsampling_puts_grid_points_at_stride_multiples():
    coarse = torch.rand(1, 2, 5, 3)
    fine = upsample(coarse, 4, (20, 12), "center")
    assert fine.shape == (1, 2, 20, 12)
    torch.testing.assert_close(fine[..., ::4, ::4], coarse)
    # halfway between two grid points is their mean; past the last, the edge value
    torch.testing.assert_close(fine[..., 2, 0], coarse[..., :2, 0].mean(-1))
    torch.testing.assert_close(fine[..., 17:, :], fine[..., 16:17, :].expand(-1, -1, 3, -1))
    torch.testing.assert_close(fine[..., :, 9:], fine[..., :, 8:9].expand(-1, -1, -1, 3))


def test_center_join_samples_coarse_stage_at_patch_centres(embedding):
    x = torch.rand(1, 3, 64, 64)
    joined = embedding(x)
    layer1, layer2 = embedding.backbone(embedding_input(embedding, x))
    raw = torch.cat([layer1, upsample(layer2, 2, (16, 16), "center")], dim=1)
    torch.testing.assert_close(joined, F.normalize(raw, dim=1))
    # stride-8 feature j sits on stride-4 patch 2j
    torch.testing.assert_close(raw[:, 64:, ::2, ::2], layer2)


def embedding_input(embedding, x):
    return (x - embedding.mean) / embedding.std


def test_bad_alignment_is_named(embedding):
    with pytest.raises(ValueError, match="alignment"):
        PatchEmbedding(embedding.backbone, alignment="corner")


@pytest.mark.parametrize("alignment", ["center", "paper"])
def test_network_computes_one_minus_max_cosine(embedding, alignment):
    embedding = PatchEmbedding(embedding.backbone, alignment=alignment)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    prototypes = torch.randn(7, 192)
    net = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=0).eval()
    maps, scores = net(x)

    feats = embedding(x).permute(0, 2, 3, 1).numpy()  # (N, h, w, C), unit rows
    protos = F.normalize(prototypes, dim=1).numpy()
    patch = 1 - (feats @ protos.T).max(axis=-1)
    expected = upsample(torch.from_numpy(patch)[:, None], 4, (64, 64), alignment)[:, 0]
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


@pytest.mark.parametrize("alignment", ["center", "paper"])
@pytest.mark.parametrize("sigma", [0.0, 4.0])
@pytest.mark.parametrize("grid, size", [((16, 16), (64, 64)), ((13, 18), (50, 72))])
def test_readout_matrices_are_the_upsampling_then_the_smoothing(embedding, alignment, sigma,
                                                                grid, size):
    # the maps come from one matrix per axis; the same as upsampling and
    # then smoothing (which matches scipy: test_smoothing_matches_scipy)
    emb = PatchEmbedding(embedding.backbone, alignment=alignment)
    net = ProtoADNetwork(emb, torch.randn(3, 192), None, sigma=sigma)
    patches = torch.rand(2, 1, *grid)
    expected = GaussianSmoothing(sigma, None)(upsample(patches, 4, size, alignment)[:, 0])
    maps, _ = net.readout(patches, patches, size)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)


def test_a_patch_equal_to_a_prototype_scores_zero(embedding):
    x = torch.rand(1, 3, 64, 64)
    feats = embedding(x)
    prototypes = feats[0].flatten(1).T  # every patch is a prototype
    net = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=0)
    maps, scores = net(x)
    assert scores.item() < 1e-5
    other = net(torch.rand(1, 3, 64, 64))[1].item()
    assert other > 1e-3


def test_results_do_not_depend_on_the_batch(embedding):
    net = ProtoADNetwork(embedding, torch.randn(5, 192), (64, 64))
    x = torch.rand(4, 3, 64, 64)
    together = net(x)[0]
    alone = torch.cat([net(x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "normalization, image_score",
    [("patch", "map"), ("image", "map"), ("image", "projection"), ("image", "cosine")],
)
def test_head_in_bands_equals_the_head_in_one_piece(embedding, monkeypatch, normalization,
                                                    image_score):
    # bands of 5 rows of a 16-patch-wide grid: they cut images mid-way and
    # the last one is short. Traced, the head runs in one piece, as exports do.
    monkeypatch.setattr(network, "BAND_PATCHES", 80)
    calls = []
    one_piece = ProtoADNetwork._patch_scores
    monkeypatch.setattr(ProtoADNetwork, "_patch_scores",
                        lambda self, f: calls.append(f.shape) or one_piece(self, f))
    emb = PatchEmbedding(embedding.backbone, normalization=normalization)
    torch.manual_seed(0)
    net = ProtoADNetwork(emb, torch.randn(7, 192), (64, 64), image_score=image_score).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        maps, scores = net.head(emb(x))
    assert [shape[2] for shape in calls] == [5] * 9 + [3]
    traced = torch.jit.trace(net, x[:1], check_trace=False)
    calls.clear()
    with torch.inference_mode():
        traced_maps, traced_scores = traced(x)
    assert not calls
    torch.testing.assert_close(maps, traced_maps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scores, traced_scores, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "normalization, image_score, padding, whitened",
    [("patch", "map", "zeros", False), ("image", "map", "reflect", False),
     ("image", "projection", "zeros", False), ("image", "cosine", "zeros", False),
     ("image", "projection", "zeros", True), ("image", "map", "reflect", True)],
)
@pytest.mark.parametrize("size", [(64, 64), (72, 52)])
def test_products_at_each_stages_stride_equal_the_joined_head(monkeypatch, normalization,
                                                              image_score, padding, whitened,
                                                              size):
    # On the CPU the network multiplies the coarser stages by the prototypes
    # at their own stride and interpolates the products; traced, it joins the
    # stages first. Stages 2 and 3 (factors 2 and 4) interpolated, in bands
    # of 8 rows that cut images mid-way; 72 x 52 leaves a grid of 18 x 13,
    # no multiple of 4, whose coarsest stage (5 x 4) ends before it (edges
    # repeated), and a short last band.
    monkeypatch.setattr(network, "BAND_PATCHES", 8 * 16)
    backbone = create_feature_extractor("resnet18", (1, 2, 3), weights=None)
    emb = PatchEmbedding(backbone, neighborhood_size=3, normalization=normalization,
                         padding=padding)
    torch.manual_seed(0)
    net = ProtoADNetwork(emb, torch.randn(9, 448), size, image_score=image_score,
                         score_baseline=torch.rand(4, 4),
                         map_whitening=_random_whitening(64) if whitened else None).eval()
    assert net._interpolated_stages() == [(1, 2), (2, 4)]
    x = torch.rand(3, 3, *size)
    with torch.inference_mode():
        maps, scores = net(x)
        traced = torch.jit.trace(net, x[:1], check_trace=False)
        traced_maps, traced_scores = traced(x)
        one_piece = net.readout(*net._patch_scores(emb(x).contiguous(
            memory_format=torch.channels_last)))
    torch.testing.assert_close(maps, traced_maps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(scores, traced_scores, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(maps, one_piece[0], atol=2e-5, rtol=1e-5)
    assert not torch.equal(maps, traced_maps)  # the two ways really differ


def _random_whitening(channels, seed=0):
    """A symmetric positive definite matrix far from the identity."""
    a = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / channels + 0.1 * torch.eye(channels)


@pytest.fixture(scope="module")
def whitening_case():
    """An embedding with distances, prototypes and a whitening ``W`` of its
    finest stage's 64 channels."""
    backbone = create_feature_extractor("resnet18", (1, 2, 3), weights=None)
    emb = PatchEmbedding(backbone, neighborhood_size=3, normalization="image")
    torch.manual_seed(0)
    return emb, torch.randn(9, 448) * 0.2, _random_whitening(64)


def _mapped_finest(features, prototypes, matrix):
    """The features' rows (n h w, C) and the prototypes with their first
    ``len(matrix)`` channels mapped by the symmetric ``matrix``."""
    c0 = len(matrix)
    mapped = features.clone()
    mapped[:, :c0] = torch.einsum("ij,njhw->nihw", matrix, features[:, :c0])
    mapped_prototypes = prototypes.clone()
    mapped_prototypes[:, :c0] = prototypes[:, :c0] @ matrix
    return mapped.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), mapped_prototypes


@pytest.mark.parametrize("image_score", ["projection", "cosine", "map"])
def test_whitened_map_is_the_distance_in_the_whitened_metric(whitening_case, image_score):
    # map_whitening W on the finest stage's 64 channels: the map is
    # min_k |W x0 - W p0|^2 + |x_r - p_r|^2 (under the root), in every way
    # the network computes it: stage-wise (CPU), one piece, traced; the
    # projection and cosine scores stay those of the plain metric
    emb, prototypes, w = whitening_case
    net = ProtoADNetwork(emb, prototypes, (64, 64), image_score=image_score,
                         map_whitening=w).eval()
    plain = ProtoADNetwork(emb, prototypes, (64, 64), image_score=image_score).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        features = emb(x)
        expected = torch.cdist(*_mapped_finest(features, prototypes, w)).amin(dim=1)
        expected = expected.view(2, 1, 16, 16)
        traced = torch.jit.trace(net, x[:1], check_trace=False)
        staged = net.image_patch_scores(x)
        for map_patches, score_patches in (staged, net.patch_scores(features)):
            torch.testing.assert_close(map_patches, expected, atol=2e-5, rtol=1e-4)
            plain_map, plain_score = plain.patch_scores(features)
            if image_score == "map":
                assert score_patches is map_patches
            else:
                torch.testing.assert_close(score_patches, plain_score, atol=2e-5, rtol=1e-4)
        assert (staged[0] - plain_map).abs().max() > 0.01  # the metric does change the map
        torch.testing.assert_close(traced(x)[0], net(x)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("image_score", ["projection", "cosine"])
@pytest.mark.parametrize("score_whitening", [0.5, 1.0])
def test_score_whitening_scores_in_the_blended_metric(whitening_case, image_score,
                                                       score_whitening):
    # the image score in the metric M = (1 - s) I + s W^2 on the finest
    # stage: computed directly through M's square root (features and
    # prototypes mapped by it, then the plain formulas), against every way the
    # network computes it; the map stays the whitened distance
    emb, prototypes, w = whitening_case
    net = ProtoADNetwork(emb, prototypes, (64, 64), image_score=image_score,
                         map_whitening=w, score_whitening=score_whitening).eval()
    whitened_only = ProtoADNetwork(emb, prototypes, (64, 64), image_score=image_score,
                                   map_whitening=w).eval()
    values, vectors = torch.linalg.eigh(
        (1 - score_whitening) * torch.eye(64) + score_whitening * w @ w)
    root = (vectors * values.sqrt()) @ vectors.T
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        features = emb(x)
        mapped, mapped_prototypes = _mapped_finest(features, prototypes, root)
        norms = mapped.norm(dim=1)
        projection = (mapped @ F.normalize(mapped_prototypes, dim=1).T).amax(dim=1)
        expected = norms - projection if image_score == "projection" else 1 - projection / norms
        expected = expected.view(2, 1, 16, 16)
        staged = net.image_patch_scores(x)
        for map_patches, score_patches in (staged, net.patch_scores(features)):
            torch.testing.assert_close(score_patches, expected, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(map_patches, whitened_only.patch_scores(features)[0],
                                       atol=2e-5, rtol=1e-4)
        # the score does move with the metric
        assert (staged[1] - whitened_only.patch_scores(features)[1]).abs().max() > 1e-3
        traced = torch.jit.trace(net, x[:1], check_trace=False)
        torch.testing.assert_close(traced(x)[1], net(x)[1], atol=2e-5, rtol=1e-4)


def test_bad_score_whitening_is_named(embedding):
    with pytest.raises(ValueError, match=r"score_whitening must be in \[0, 1\]"):
        ProtoADNetwork(embedding, torch.randn(3, 192), (64, 64), score_whitening=1.5)


def test_bad_map_whitening_is_named(embedding):
    prototypes = torch.randn(3, 192)
    image = PatchEmbedding(embedding.backbone, normalization="image")
    with pytest.raises(ValueError, match=r"map_whitening must have shape \(64, 64\)"):
        ProtoADNetwork(image, prototypes, (64, 64), map_whitening=torch.eye(192))
    with pytest.raises(ValueError, match="needs normalization='image'"):
        ProtoADNetwork(embedding, prototypes, (64, 64), map_whitening=torch.eye(64))


def test_stage_products_are_interpolated_only_where_they_save_work(embedding, monkeypatch):
    backbone = create_feature_extractor("resnet18", (1, 2, 3), weights=None)
    net = ProtoADNetwork(PatchEmbedding(backbone), torch.randn(3, 448), (64, 64))
    # saved multiply-adds per patch and prototype: 128 * 3/4 = 96, 256 * 15/16 = 240
    monkeypatch.setattr(network, "STAGE_PRODUCT_MIN_SAVING", 100)
    assert net._interpolated_stages() == [(2, 4)]
    monkeypatch.setattr(network, "STAGE_PRODUCT_MIN_SAVING", 300)
    assert net._interpolated_stages() == []
    paper = ProtoADNetwork(PatchEmbedding(backbone, alignment="paper"), torch.randn(3, 448),
                           (64, 64))
    monkeypatch.setattr(network, "STAGE_PRODUCT_MIN_SAVING", 0)
    assert paper._interpolated_stages() == []  # its join repeats features instead


def test_an_embedding_with_its_own_features_is_scored_through_them():
    # the stage-wise products assume forward = join / divisors: a subclass
    # that maps its features must not be scored without its map
    class Shifted(PatchEmbedding):
        def forward(self, images):
            features = super().forward(images)
            return features + torch.linspace(0, 1, features.shape[1])[:, None, None]

    backbone = create_feature_extractor("resnet18", (1, 2, 3), weights=None)
    torch.manual_seed(0)
    prototypes = torch.randn(5, 448)
    shifted = ProtoADNetwork(Shifted(backbone), prototypes, (64, 64)).eval()
    plain = ProtoADNetwork(PatchEmbedding(backbone), prototypes, (64, 64)).eval()
    assert shifted._interpolated_stages() == []
    assert plain._interpolated_stages()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        got = shifted(x)
        expected = shifted.readout(*shifted.patch_scores(shifted.embedding(x)))
    torch.testing.assert_close(got, expected)


def test_backbone_in_chunks_equals_the_traced_backbone_in_one_pass(embedding, monkeypatch):
    # two 64 x 64 images per pass on the CPU: a batch of 5 in three passes,
    # the last one short; traced, the embedding runs the batch in one pass
    monkeypatch.setattr(network, "CPU_CHUNK_PIXELS", 2 * 64 * 64)
    passes = []
    one_pass = PatchEmbedding._join
    monkeypatch.setattr(PatchEmbedding, "_join",
                        lambda self, x: passes.append(len(x)) or one_pass(self, x))
    emb = PatchEmbedding(embedding.backbone, neighborhood_size=3, normalization="image").eval()
    x = torch.rand(5, 3, 64, 64)
    with torch.inference_mode():
        chunked = emb(x)
    assert passes == [2, 2, 1]
    traced = torch.jit.trace(emb, x[:1], check_trace=False)
    passes.clear()
    with torch.inference_mode():
        whole = traced(x)
    assert not passes
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_prototypes_are_stored_unit_norm(embedding):
    net = ProtoADNetwork(embedding, 3 * torch.randn(4, 192), (64, 64))
    torch.testing.assert_close(net.prototypes.norm(dim=1), torch.ones(4))


def test_wrong_prototype_width_is_named(embedding):
    with pytest.raises(ValueError, match=r"\(n_prototypes, 192\)"):
        ProtoADNetwork(embedding, torch.randn(4, 10), (64, 64))


def test_network_has_no_trainable_parameters(embedding):
    net = ProtoADNetwork(embedding, torch.randn(4, 192), (64, 64))
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.embedding.backbone.training  # batch-norm statistics stay frozen


def test_neighborhood_averages_each_stage_before_the_join(embedding):
    x = torch.rand(1, 3, 64, 64)
    local = PatchEmbedding(embedding.backbone, neighborhood_size=3)
    layer1, layer2 = embedding.backbone(embedding_input(embedding, x))
    pooled = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=False) for m in (layer1, layer2)]
    raw = torch.cat([pooled[0], upsample(pooled[1], 2, (16, 16), "center")], dim=1)
    torch.testing.assert_close(local(x), F.normalize(raw, dim=1))
    # an inner patch is the plain mean of its 3 x 3 neighbours
    torch.testing.assert_close(pooled[0][..., 5, 7], layer1[..., 4:7, 6:9].mean((-2, -1)))
    assert not torch.allclose(local(x), embedding(x))


@pytest.mark.parametrize("size", [0, 2, 1.0, True])
def test_bad_neighborhood_size_is_named(embedding, size):
    with pytest.raises(ValueError, match="neighborhood_size"):
        PatchEmbedding(embedding.backbone, neighborhood_size=size)


def test_reflect_padding_is_the_zero_padded_embedding_of_the_mirrored_image():
    import torch.nn.functional as F

    from skprotoad.backbones import create_feature_extractor
    from skprotoad.network import PatchEmbedding

    torch.manual_seed(0)
    backbone = create_feature_extractor("resnet18", (1, 2, 3), weights=None).eval()
    images = torch.rand(2, 3, 64, 96)
    common = dict(neighborhood_size=3, normalization="patch")
    reflect = PatchEmbedding(backbone, padding="reflect", **common)
    zeros = PatchEmbedding(backbone, **common)
    with torch.inference_mode():
        got = reflect.join(images)
        # the image mirrored by the coarsest stride (16), then the features cut
        # back: each stage by 16 / its stride, before the stages are joined
        mean, std = zeros.mean, zeros.std
        mirrored = F.pad((images - mean) / std, (16, 16, 16, 16), mode="reflect") * std + mean
        stages = backbone(((mirrored - mean) / std).contiguous(memory_format=torch.channels_last))
        stages = [F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False) for m in stages]
        cut = [m[..., 16 // s: m.shape[-2] - 16 // s, 16 // s: m.shape[-1] - 16 // s]
               for m, s in zip(stages, backbone.strides)]
    assert got.shape == zeros.join(images).shape == (2, sum(backbone.channels), 16, 24)
    expected = torch.cat([cut[0]] + [
        upsample(m, s // 4, (16, 24), "center") for m, s in zip(cut[1:], backbone.strides[1:])
    ], dim=1)
    torch.testing.assert_close(got, expected)
    # and the border patches see something else than zeros
    assert (got - zeros.join(images))[..., 0, :].abs().max() > 1e-3
