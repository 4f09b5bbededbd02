"""Run-config composition: merging, overrides, strict validation, no code from YAML."""

from __future__ import annotations

import pytest

from medvlsam2.core.config import load_config, make_plugin_config, to_yaml
from medvlsam2.core.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


EXAMPLE = """
model:
  encoder: {name: simple_cnn3d, widths: [8, 16]}
tasks:
  - {name: volume_classification, weight: 3, classes: [a, b], data: {root: /data/x}}
stages:
  - {name: probe, tasks: [volume_classification], trainable: [encoder, head], max_steps: 4}
trainer: {max_steps: 10}
"""


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", EXAMPLE)
    b = write(tmp_path, "b.yaml", "trainer: {max_steps: 20, precision: bf16-mixed}\nseed: 7\n")
    cfg = load_config([a, b], ["seed=9", "model.encoder.widths=[4,8]"])
    assert cfg.trainer.max_steps == 20 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.seed == 9
    assert list(cfg.model.encoder.widths) == [4, 8]
    assert cfg.tasks[0].weight == 3
    assert "simple_cnn3d" in to_yaml(cfg)


def test_interpolation_resolves(tmp_path):
    a = write(tmp_path, "a.yaml", EXAMPLE + "run_name: demo\noutput_dir: runs/${run_name}\n")
    assert load_config([a]).output_dir == "runs/demo"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_stepz=3", "unknown key 'trainer.max_stepz' (did you mean 'max_steps'?)"),
        ("trainer.max_steps=many", "trainer.max_steps: wrong type"),
        ("sed=3", "unknown key 'sed' (did you mean 'seed'?)"),
        ("model.encoder.widthz=[1]", "unknown key 'model.encoder.widthz' (did you mean 'widths'?)"),
        ("model.encoder.widths=wide", "model.encoder.widths"),
        ("model.encoder.name=vit_3d", "model.encoder.name: unknown encoder 'vit_3d' (did you mean 'vit3d'?)"),
        ("tasks.0.weight=-1", "tasks[0].weight: expected a positive number"),
        ("stages.0.tasks=[report]", "stages[0].tasks[0]: task 'report' is not in `tasks`"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size: expected at least 1, got 0"),
        ("trainer.batch_size=-2", "trainer.batch_size: expected at least 1, got -2"),
    ],
)
def test_bad_values_name_the_dotted_path(tmp_path, override, expected):
    a = write(tmp_path, "a.yaml", EXAMPLE)
    with pytest.raises(ConfigError) as err:
        load_config([a], [override])
    assert expected in str(err.value)


def test_unknown_task_key_is_reported_with_task_index(tmp_path):
    a = write(tmp_path, "a.yaml", EXAMPLE.replace("classes: [a, b]", "clases: [a, b]"))
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\].clases' \(did you mean 'classes'\?\)"):
        load_config([a])


@pytest.mark.parametrize(
    "text",
    [
        "model:\n  encoder: {_target_: os.system, name: vit3d}\n",
        "model:\n  encoder: {class_path: os.system}\n",
        "trainer: !!python/object/apply:os.system ['echo pwned']\n",
        "model: !!python/name:os.system\n",
    ],
)
def test_yaml_cannot_import_or_call_code(tmp_path, text):
    path = write(tmp_path, "evil.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert str(path) in str(err.value)


def test_override_cannot_add_target():
    with pytest.raises(ConfigError, match="import paths are not allowed"):
        load_config([], ["model.decoder._target_=os.system"], validate_plugins=False)


def test_missing_file_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config([tmp_path / "nope.yaml"])
    bad = write(tmp_path, "bad.yaml", "model: {encoder: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config([bad])
    listy = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config([listy])


def test_plugin_config_instance_is_typed():
    from medvlsam2_plugin_example.encoder import SimpleCNN3DConfig

    cfg = make_plugin_config(SimpleCNN3DConfig, {"widths": [4, 8], "name": "simple_cnn3d"}, path="model.encoder")
    assert isinstance(cfg, SimpleCNN3DConfig)
    assert tuple(cfg.widths) == (4, 8)
    with pytest.raises(ConfigError, match="model.encoder.in_channels: wrong type"):
        make_plugin_config(SimpleCNN3DConfig, {"in_channels": "one"}, path="model.encoder")
