"""Untrusted files never run code: pickles are refused, configs cannot import."""

from __future__ import annotations

import pickle

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
