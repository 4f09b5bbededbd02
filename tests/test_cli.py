"""The command line: sub-commands, one-line errors, fast start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medvlsam2.core.cli import main

HEAVY = ("torch", "transformers", "monai", "sam2", "lightning", "timm", "peft", "omegaconf")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvlsam2", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["list", "encoders"]])
def test_light_commands_import_no_heavy_library(args):
    code = (
        "import sys, contextlib, io\n"
        "from medvlsam2.core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try: main({args!r})\n"
        "    except SystemExit: pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_is_the_same_program():
    out = run_module("--version")
    assert out.returncode == 0 and out.stdout.startswith("medvlsam2 ")


def test_plugins_table_and_json(capsys):
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["KIND", "NAME", "PROVIDER", "VERSION"]
    assert "sam2_volume" in table and "simple_cnn3d" in table
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["plugins"]
    example = next(r for r in rows if r["name"] == "simple_cnn3d")
    assert example == {
        "kind": "encoders", "name": "simple_cnn3d", "provider": "medvlsam2-plugin-example",
        "version": "0.1.0", "summary": "A small strided 3D CNN (example plugin)",
    }


def test_list_with_glob(capsys):
    assert main(["list", "encoders", "vit*"]) == 0
    assert capsys.readouterr().out.split() == ["vit3d"]


def test_show_prints_default_config(capsys):
    assert main(["show", "encoders", "simple_cnn3d", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["widths"] == [16, 32, 64, 128]
    assert info["provider"] == "medvlsam2-plugin-example"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["show", "encoders", "vitt3d"], "unknown encoder 'vitt3d' (did you mean 'vit3d'?)"),
        (["list", "encodrs"], "unknown plugin kind 'encodrs' (did you mean 'encoders'?)"),
        (["config", "--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
        (["config", "trainer.max_stepz=1"], "unknown key 'trainer.max_stepz'"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, expected):
    out = run_module(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medvlsam2: error: ")
    assert expected in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_traceback():
    out = run_module("--debug", "show", "encoders", "nope")
    assert out.returncode != 0 and "Traceback" in out.stderr
