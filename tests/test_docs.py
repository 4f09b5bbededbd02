"""Every hook is documented in docs/plugins.md with its signature (as datasette does)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from medvlsam2.core import hookspecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = [name for name, f in vars(hookspecs).items() if name.startswith("register_") and inspect.isfunction(f)]


def test_there_is_one_hook_per_kind():
    from medvlsam2.core.registry import KINDS

    assert sorted(HOOKS) == sorted(f"register_{kind}" for kind in KINDS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_signature(hook):
    text = DOC.read_text()
    assert f"### {hook}(register)" in text, f"{hook} has no section in docs/plugins.md"
