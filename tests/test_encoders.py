"""Every registered encoder: shapes, gradients, input checks, and its pretrained weights."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from medvlsam2.core.errors import InputError, MedVLError
from medvlsam2.core.registry import BUILTIN_PROVIDER, build, get_host

#: Tiny settings per built-in encoder and a volume it accepts.
ENCODER_CASES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "vit3d": (
        {"img_size": [8, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64,
         "num_layers": 1, "num_heads": 2},
        (2, 1, 8, 32, 32),
    ),
    "timm_slices": ({"model_name": "resnet10t", "depth_pos": "learned"}, (2, 1, 2, 32, 32)),
    "sam2_hiera": ({"image_size": 64}, (1, 1, 2, 32, 32)),
    "medsam_tinyvit": ({"depth_pos": "learned"}, (1, 1, 1, 24, 24)),
    "deepbet_unet3d": ({"out_stage": 2}, (1, 1, 32, 32, 32)),
}
#: Pretrained 2D backbones too slow to train through on 2 CPU cores: frozen here, as in stage training.
FROZEN_BACKBONE = {"medsam_tinyvit": "tinyvit"}

_built: dict[str, torch.nn.Module] = {}


def tiny_encoder(name: str) -> torch.nn.Module:
    if name not in _built:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = build("encoders", name, ENCODER_CASES[name][0])
        if name in FROZEN_BACKBONE:
            getattr(enc, FROZEN_BACKBONE[name]).requires_grad_(False)
            enc.train()  # as a trainer does after freezing: frozen BatchNorm stays in eval
        _built[name] = enc
    return _built[name]


def test_every_builtin_encoder_is_covered():
    builtin = {n for n, s in get_host().specs("encoders").items() if s.provider == BUILTIN_PROVIDER}
    assert builtin == set(ENCODER_CASES)


@pytest.mark.parametrize("name", sorted(ENCODER_CASES))
def test_encoder_forward_backward(name):
    enc = tiny_encoder(name)
    shape = ENCODER_CASES[name][1]
    out = enc(torch.rand(shape))
    d, h, w = out.grid
    assert out.tokens.shape == (shape[0], d * h * w, enc.out_dim)
    assert torch.isfinite(out.tokens).all()
    enc.zero_grad(set_to_none=True)
    out.tokens.square().mean().backward()
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    for n, p in enc.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


@pytest.mark.parametrize("name", sorted(ENCODER_CASES))
def test_encoder_rejects_wrong_channels(name):
    enc = tiny_encoder(name)
    shape = list(ENCODER_CASES[name][1])
    shape[1] = 2
    with pytest.raises(InputError, match="channel"):
        enc(torch.rand(shape))
    with pytest.raises(InputError, match=r"\(B, C, D, H, W\)"):
        enc(torch.rand(shape[2:]))


def test_size_constraints_name_the_axis():
    with pytest.raises(InputError, match="H=30 \\(multiple of 8\\)"):
        tiny_encoder("vit3d")(torch.rand(1, 1, 8, 30, 32))
    with pytest.raises(InputError, match="D=20 \\(multiple of 16\\)"):
        tiny_encoder("deepbet_unet3d")(torch.rand(1, 1, 20, 32, 32))
    fixed = build("encoders", "vit3d", {**ENCODER_CASES["vit3d"][0], "interpolate_pos": False})
    with pytest.raises(InputError, match="interpolate_pos"):
        fixed(torch.rand(1, 1, 8, 32, 64))


def test_vit3d_other_sizes_resample_positions():
    enc = tiny_encoder("vit3d")
    out = enc(torch.rand(1, 1, 16, 32, 48))
    assert out.grid == (4, 4, 6) and out.tokens.shape == (1, 96, 32)


def test_vit3d_loads_m3d_clip_keys(tmp_path):
    from safetensors.torch import save_file

    from medvlsam2.plugins.encoders.vit3d import resample_pos

    enc = build("encoders", "vit3d", ENCODER_CASES["vit3d"][0])
    state = {f"vision_encoder.{k[len('vit.'):]}": torch.randn_like(v) for k, v in enc.state_dict().items()
             if "norm_cross_attn" not in k}
    m3d_pos = torch.randn(1, 8 * 16 * 16, 32)  # M3D's 32x256x256 / 4x16x16 position table
    state["vision_encoder.patch_embedding.position_embeddings"] = m3d_pos
    state["mm_vision_proj.weight"] = torch.zeros(2, 2)  # another tower's key: not ours
    path = tmp_path / "m3d.safetensors"
    save_file(state, str(path))
    report = enc.load_pretrained(path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, state["vision_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.vit.cls_token, state["vision_encoder.cls_token"])
    expected = resample_pos(m3d_pos, (8, 16, 16), (2, 4, 4))
    assert torch.allclose(enc.vit.patch_embedding.position_embeddings, expected)
    state["vision_encoder.patch_embedding.position_embeddings"] = torch.randn(1, 63, 32)
    save_file(state, str(path))
    with pytest.raises(InputError, match="63 entries"):
        enc.load_pretrained(path)


def test_timm_slices_loads_a_stock_checkpoint_with_channel_adaptation(tmp_path):
    import timm

    stock = timm.create_model("resnet10t", pretrained=False)  # 3 channels, with classifier
    path = tmp_path / "resnet10t.pth"
    torch.save(stock.state_dict(), path)
    enc = build("encoders", "timm_slices", {"model_name": "resnet10t", "pretrained": str(path)})
    assert torch.equal(enc.backbone.layer4[0].conv1.weight, stock.layer4[0].conv1.weight)
    first = stock.state_dict()["conv1.0.weight"]
    assert torch.allclose(enc.backbone.conv1[0].weight, first.sum(1, keepdim=True))  # 3 -> 1 channel


def test_slice_depth_encoding_and_pooling():
    args = {"model_name": "resnet10t", "depth_pos": "sinusoidal"}
    enc = build("encoders", "timm_slices", args).eval()
    same = torch.rand(1, 1, 1, 32, 32).expand(1, 1, 4, 32, 32)
    tokens = enc(same).tokens.reshape(1, 4, -1, enc.out_dim)
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])  # identical slices, different depths
    plain = build("encoders", "timm_slices", {**args, "depth_pos": "none"}).eval()
    plain.load_state_dict(enc.state_dict(), strict=False)
    tokens = plain(same).tokens.reshape(1, 4, -1, enc.out_dim)
    assert torch.allclose(tokens[:, 0], tokens[:, 1])
    pooled = build("encoders", "timm_slices", {**args, "depth_pool": 2})
    assert pooled(torch.rand(1, 1, 4, 32, 32)).grid[0] == 2
    with pytest.raises(InputError, match="D=3"):
        pooled(torch.rand(1, 1, 3, 32, 32))


def test_sam2_hiera_takes_a_sam2_checkpoint(tmp_path):
    enc = tiny_encoder("sam2_hiera")
    state = {f"image_encoder.{k}": torch.randn_like(v) for k, v in enc.image_encoder.state_dict().items()}
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)  # the decoder's part is skipped
    path = tmp_path / "sam2.pt"
    torch.save({"model": state}, path)
    report = build("encoders", "sam2_hiera", {"image_size": 64}).load_pretrained(path)
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(state) - 1
    assert len(tiny_encoder("sam2_hiera")(torch.rand(1, 1, 1, 64, 64)).features) == 3


def test_medsam_tinyvit_holds_litemedsam_weights():
    from medvlsam2.plugins.decoders.litemedsam import litemedsam_state_dict

    enc = tiny_encoder("medsam_tinyvit")
    ref = litemedsam_state_dict()
    for key, value in enc.tinyvit.state_dict().items():
        assert torch.equal(value, ref[f"image_encoder.{key}"]), key


def test_frozen_batchnorm_keeps_its_statistics():
    enc = build("encoders", "timm_slices", {"model_name": "resnet10t"})
    enc.backbone.requires_grad_(False)
    enc.train()
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    enc(torch.rand(1, 1, 2, 32, 32) * 5)
    assert all(torch.equal(v, before[k]) for k, v in enc.backbone.state_dict().items())
    enc.backbone.requires_grad_(True)
    enc.train()
    enc(torch.rand(1, 1, 2, 32, 32) * 5)
    assert not torch.equal(enc.backbone.conv1[1].running_mean, before["conv1.1.running_mean"])


def test_deepbet_encoder_matches_its_torchscript_network():
    from medvlsam2.plugins.encoders.deepbet_unet3d import deepbet_weights

    enc = build("encoders", "deepbet_unet3d", {"normalize": False}).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(deepbet_weights()), map_location="cpu")
    relu = getattr(ts.conv, "2")
    x = torch.rand(1, 1, 32, 64, 64)
    with torch.no_grad():
        ours = enc(x).features
        ref = [ts.init(relu, x)]
        for stage in ("down0", "down1", "down2", "down3"):
            ref.append(getattr(ts, stage)(relu, ref[-1]))
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_deepbet_is_optional(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepbet" else real(n, *a))
    with pytest.raises(MedVLError, match="pip install --no-deps deepbet==1.0.2"):
        build("encoders", "deepbet_unet3d", {})
