"""The plugin hooks: one per kind, each handed a typed ``register`` callback.

A distribution provides plugins by declaring an entry point in the ``medvlsam2`` group that
points at a module implementing any of these hooks::

    from medvlsam2.core.hookspecs import hookimpl

    @hookimpl
    def register_encoders(register):
        register("my_encoder", "my_pkg.encoder:MyEncoder", summary="What it is, in one line")

The built-in plugins are registered through the very same hooks (``registry.yaml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from medvlsam2.core.registry import Registrar

PROJECT = "medvlsam2"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_encoders(register: Registrar) -> None:
    """Register volume encoders: ``(B, C, D, H, W)`` -> ``EncoderOutput`` (``VolumeEncoder``)."""


@hookspec
def register_projectors(register: Registrar) -> None:
    """Register projectors: encoder tokens ``(B, N, C)`` -> LLM embeddings ``(B, M, hidden)``."""


@hookspec
def register_llms(register: Registrar) -> None:
    """Register language models with LoRA and the ``<image>``/``[SEG]`` tokens (``LanguageModel``)."""


@hookspec
def register_decoders(register: Registrar) -> None:
    """Register mask decoders: volume + ``Prompts`` -> mask logits ``(B, K, D, H, W)`` (``MaskDecoder``)."""


@hookspec
def register_tasks(register: Registrar) -> None:
    """Register tasks: data -> batches -> losses; predictions -> metrics (``BaseTask``)."""


@hookspec
def register_data_formats(register: Registrar) -> None:
    """Register dataset readers: a data root + options -> a list of samples (``DatasetReader``)."""
