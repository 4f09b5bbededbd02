"""The composed model: encoder -> projector -> LLM (+LoRA) -> ``[SEG]`` -> mask decoder.

``llm`` and ``decoder`` (and then ``projector``) may be absent for models that need only part
of the chain, e.g. an encoder probe. Components are the unit of freezing: a stage names which
ones train (``encoder``, ``projector``, ``lora``, ``llm``, ``seg_projector``, ``decoder``,
``heads``). A component's trainable set is what its plugin left trainable when built, so a
plugin's own choices (a frozen pretrained image encoder inside the decoder, frozen LLM base
weights under LoRA) are kept; ``llm`` alone means full fine-tuning of the language model.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from medvlsam2.core.registry import get_host

COMPONENTS = ("encoder", "projector", "lora", "llm", "seg_projector", "decoder")


def _args(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return dict(node)


class MedVLModel(nn.Module):
    """Holds the trunk (or a bare encoder) and the decoder; built from ``cfg.model``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        host = get_host()
        self.decoder = None
        if cfg.decoder is not None:
            dec = _args(cfg.decoder)
            self.decoder = host.build("decoders", dec["name"], dec, path="model.decoder")
        self.trunk = None
        self._encoder = None
        if cfg.llm is not None:
            from medvlsam2.core.trunk import Trunk

            prompt_dim = self.decoder.prompt_dim if self.decoder is not None else None
            self.trunk = Trunk(cfg, prompt_dim=prompt_dim)
        else:
            enc = _args(cfg.encoder)
            self._encoder = host.build("encoders", enc["name"], enc, path="model.encoder")
        self.component_params = self._collect_components()

    @property
    def encoder(self) -> nn.Module:
        return self.trunk.encoder if self.trunk is not None else self._encoder

    def _collect_components(self) -> dict[str, list[str]]:
        """Parameter names per component, from the trainable flags the plugins set at build."""
        parts: dict[str, list[str]] = {name: [] for name in COMPONENTS}
        for name, param in self.named_parameters():
            head = name.split(".")[0]
            if head == "_encoder":
                component = "encoder"
            elif head == "decoder":
                component = "decoder"
            elif head == "trunk":
                component = name.split(".")[1]  # trunk.encoder / projector / llm / seg_projector
            else:
                component = head
            if component == "llm":
                parts["llm"].append(name)
                if param.requires_grad:
                    parts["lora"].append(name)
            elif param.requires_grad:
                parts.setdefault(component, []).append(name)
        return parts
