"""The wheel: one `medvlsam2` namespace, registry.yaml inside, works from a fresh venv."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    return next(out.glob("medvlsam2-*.whl"))


def test_wheel_has_one_namespace_and_the_registry(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"medvlsam2"}
    assert "medvlsam2/registry.yaml" in names
    assert "medvlsam2/core/registry.py" in names
    assert "medvlsam2/plugins/encoders/__init__.py" in names
    assert not any(n.startswith(("medvlsam2/tests/", "medvlsam2/examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medvlsam2 = medvlsam2.core.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_and_lists_plugins_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # System site-packages give the (large) dependencies; the venv's own medvlsam2 wins.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    code = "import medvlsam2, sys; print(medvlsam2.__file__)"
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where
    out = subprocess.run(
        [str(env_dir / "bin" / "medvlsam2"), "list", "decoders"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "sam2_volume" in out.stdout.split()
