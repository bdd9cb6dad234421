import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_image

from models.backbone import create_backbone, offline_state_dict
from models.config import ModelConfig
from models.delg import DELG, ArcFace, gem


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DELG(ModelConfig(dim=64, global_descriptor="learned", local_descriptors="learned"), num_classes=5)  # DELG's recipe


def test_offline_imagenet_weights_classify_sample_photos():
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(offline_state_dict("tf_efficientnet_lite0"))
    net.eval()
    for name, cls in (("china.jpg", 442), ("flower.jpg", 985)):  # bell cote, daisy
        x = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1)[None].float() / 255
        x = (torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True) - 0.5) / 0.5
        with torch.no_grad():
            assert net(x).argmax().item() == cls


def test_backbone_stages():
    b = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert b.feature_info.channels() == [112, 320] and b.feature_info.reduction() == [16, 32]


def test_gem_p1_is_average_and_large_p_tends_to_max():
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(gem(x, 1.0), x.mean(dim=(-2, -1)), atol=1e-6)
    assert torch.allclose(gem(x, 200.0), x.amax(dim=(-2, -1)), rtol=2e-2)  # max * (1/16)^(1/p)


def test_arcface_margin_on_true_class_only():
    head = ArcFace(8, 3, margin=0.1, scale=2.0)
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    logits = head(emb, labels)
    cos = head.cosine(emb)
    expected = cos.clone()
    theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
    expected.scatter_(1, labels[:, None], torch.cos(theta + 0.1))
    assert torch.allclose(logits, expected * 2.0, atol=1e-5)
    assert head.scale.requires_grad is False and ArcFace(64, 3).scale.item() == pytest.approx(math.sqrt(64))


def test_subcenters_and_dynamic_margins():
    counts = torch.tensor([1, 10, 1000])
    head = ArcFace(8, 3, subcenters=3, class_counts=counts)
    assert head.weight.shape == (9, 8) and head.cosine(torch.randn(2, 8)).shape == (2, 3)
    assert head.margins[0] == pytest.approx(0.5) and head.margins[2] == pytest.approx(0.05)


def test_losses_and_stop_gradient(model):
    x = torch.randn(2, 3, 96, 96)
    y = torch.tensor([0, 3])
    model.train()
    out = model.losses(x, y)
    assert set(out) >= {"loss", "global_ce", "attention_ce", "reconstruction_mse"}
    model.zero_grad()
    (out["attention_ce"] + out["reconstruction_mse"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters()), \
        "local losses must not reach the backbone"
    assert model.attention.net[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    model.losses(x, y)["global_ce"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_inference_shapes(model):
    model.eval()
    with torch.no_grad():
        g, attn, desc = model(torch.randn(2, 3, 128, 96))
    assert g.shape == (2, 64) and attn.shape == (2, 8, 6) and desc.shape == (2, 64, 8, 6)
    assert torch.allclose(g.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (attn >= 0).all() and torch.allclose(desc.norm(dim=1), torch.ones(2, 8, 6), atol=1e-5)
    assert "arcface.weight" not in model.inference_state()


def test_training_starts_from_the_off_the_shelf_descriptor_and_can_keep_backbone_local_features():
    import dataclasses

    from models.config import TrainConfig
    from models.train import _init_whitening

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", dim=512, global_descriptor="learned", local_descriptors="learned")
    trained = DELG(cfg, num_classes=3).eval()
    ots = DELG(cfg, off_the_shelf=True).eval()
    ots.load_state_dict(trained.state_dict(), strict=False)
    x = torch.randn(2, 3, 96, 96)
    _init_whitening(trained, TrainConfig(whiten_init="identity"))
    with torch.no_grad():
        g_trained, _, local_learned = trained(x)
        g_ots, _, local_ots = ots(x)
    # whiten(GeM) starts as the GeM descriptor, zero-padded from C5 to D
    assert g_trained.shape == (2, 512) and torch.allclose(g_trained[:, :g_ots.shape[1]], g_ots, atol=1e-5)
    assert torch.count_nonzero(g_trained[:, g_ots.shape[1]:]) == 0
    assert local_learned.shape[1] == trained.local_dim
    trained.cfg = dataclasses.replace(trained.cfg, local_descriptors="backbone")
    with torch.no_grad():
        _, _, local_backbone = trained(x)
    assert torch.allclose(local_backbone, local_ots, atol=1e-5)  # the stage itself, as off the shelf


def test_the_learned_descriptor_can_keep_the_backbone_s_own_beside_it():
    import dataclasses

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", dim=64, global_descriptor="learned")
    model = DELG(cfg, num_classes=3).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        _, global_map = model.features(x)
        learned = model.global_descriptor(global_map)
        assert learned.shape == (2, 64) == (2, model.descriptor_dim)
        model.cfg = dataclasses.replace(model.cfg, global_descriptor="learned+gem", gem_weight=1.5)
        both = model.global_descriptor(global_map)
        c5 = model.whiten.in_features
        assert both.shape == (2, c5 + 64) == (2, model.descriptor_dim)
        assert torch.allclose(both.norm(dim=-1), torch.ones(2), atol=1e-5)
        # the two halves in the ratio 1.5 : 1, the learned half is the learned descriptor
        assert torch.allclose(both[:, :c5].norm(dim=-1) / both[:, c5:].norm(dim=-1), torch.full((2,), 1.5), atol=1e-4)
        assert torch.allclose(F.normalize(both[:, c5:], dim=-1), learned, atol=1e-5)
        # training still fits ArcFace on the learned half
        assert torch.allclose(model.learned_descriptor(global_map), learned, atol=1e-6)
        model.cfg = dataclasses.replace(model.cfg, global_descriptor="other")
        with pytest.raises(ValueError, match="global_descriptor"):
            model.global_descriptor(global_map)
