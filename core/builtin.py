"""Registers the built-in plugins listed in ``registry.yaml`` through the ordinary hooks."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from medvlsam2.core.hookspecs import hookimpl
from medvlsam2.core.registry import Registrar


@cache
def catalog() -> dict[str, dict[str, dict[str, str]]]:
    """``registry.yaml``: ``{kind: {name: {target, summary}}}``."""
    text = resources.files("medvlsam2").joinpath("registry.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def _register_kind(kind: str, register: Registrar) -> None:
    for name, entry in (catalog().get(kind) or {}).items():
        register(name, entry["target"], summary=entry.get("summary", ""))


@hookimpl
def register_encoders(register: Registrar) -> None:
    _register_kind("encoders", register)


@hookimpl
def register_projectors(register: Registrar) -> None:
    _register_kind("projectors", register)


@hookimpl
def register_llms(register: Registrar) -> None:
    _register_kind("llms", register)


@hookimpl
def register_decoders(register: Registrar) -> None:
    _register_kind("decoders", register)


@hookimpl
def register_tasks(register: Registrar) -> None:
    _register_kind("tasks", register)


@hookimpl
def register_data_formats(register: Registrar) -> None:
    _register_kind("data_formats", register)
