"""Task mixing: batches are single-task, drawn by weight, reproducible per (seed, epoch)."""

from __future__ import annotations

from collections import Counter

import pytest

from medvlsam2.core.data import TaskMixDataset, WeightedTaskBatchSampler


def mix() -> TaskMixDataset:
    return TaskMixDataset({"a": [{"i": i} for i in range(10)], "b": [{"i": i} for i in range(7)]})


def task_of(data: TaskMixDataset, batch: list[int]) -> str:
    keys = {data[i][0] for i in batch}
    assert len(keys) == 1, "a batch mixes tasks"
    return keys.pop()


def test_weights_3_to_1_sample_about_3_to_1():
    data = mix()
    sampler = WeightedTaskBatchSampler(data, {"a": 3.0, "b": 1.0}, batch_size=2, num_batches=4000, seed=1)
    counts = Counter(task_of(data, batch) for batch in sampler)
    assert abs(counts["a"] / counts["b"] - 3.0) < 0.3


def test_every_sample_visited_before_repeating():
    data = mix()
    sampler = WeightedTaskBatchSampler(data, {"a": 1.0, "b": 0.0}, batch_size=5, num_batches=2, seed=0)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(10))


def test_stream_depends_only_on_seed_and_epoch():
    data = mix()
    first = WeightedTaskBatchSampler(data, {"a": 1, "b": 1}, batch_size=2, num_batches=20, seed=5)
    second = WeightedTaskBatchSampler(data, {"a": 1, "b": 1}, batch_size=2, num_batches=20, seed=5)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    second.set_epoch(4)
    assert list(first) != list(second)


def test_evaluation_batches_take_eval_batch_size_and_cover_each_split_once():
    from medvlsam2.core.data import MedVLDataModule

    class Task:
        def __init__(self, n):
            self.n = n

        def samples(self, split):
            return [{"i": i} for i in range(self.n)]

    tasks = {"a": Task(10), "b": Task(7)}
    sizes = {}
    for eval_size in (None, 4):
        module = MedVLDataModule(tasks, {"a": 1.0, "b": 1.0}, batch_size=2, eval_batch_size=eval_size)
        loaders = module._eval_loaders("test")
        batches = [list(loader.batch_sampler) for loader in loaders]
        # one loader per task; every sample once, in order, in batches of one task
        assert [[i for b in bs for i in b] for bs in batches] == [list(range(10)), list(range(10, 17))]
        sizes[eval_size] = [[len(b) for b in bs] for bs in batches]
    assert sizes[None] == [[2] * 5, [2, 2, 2, 1]]  # default: the training batch size
    assert sizes[4] == [[4, 4, 2], [4, 3]]


def test_a_stage_batch_size_sets_its_training_batches_and_leaves_evaluation_to_the_trainer():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from medvlsam2.core.config import StageConfig, load_config
    from medvlsam2.core.errors import ConfigError
    from medvlsam2.core.run import _datamodule

    class Task:
        def samples(self, split):
            return [{"i": i} for i in range(10)]

    cfg = OmegaConf.create({"tasks": [{"name": "a"}], "trainer": {"batch_size": 2, "eval_batch_size": None,
                                                                   "num_workers": 0, "steps_per_epoch": 3}, "seed": 0})
    module = SimpleNamespace(tasks={"a": Task()}, task_weights={"a": 1.0})
    sizes = {}
    for stage_size in (None, 8):
        data = _datamodule(cfg, module, StageConfig(name="s", tasks=["a"], batch_size=stage_size))
        data.trainer = None
        sizes[stage_size] = {len(b) for b in data.train_dataloader().batch_sampler}
    assert sizes == {None: {2}, 8: {8}}
    evaluation = _datamodule(cfg, module, StageConfig(name="test", tasks=["a"]))
    assert evaluation.batch_size == 2
    with pytest.raises(ConfigError, match=r"stages\[0\]\.batch_size: expected at least 1, got 0"):
        load_config([], ["tasks=[]", "stages=[{name: s, batch_size: 0}]"])


def three_entry_run(steps_per_epoch: int):
    """A run config with the entries seg, vqa, seg (keys seg, vqa, seg_2; weights 3, 1, 2) and a module
    stand-in holding a four-sample task per key: what `_datamodule` reads."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    class Task:
        def samples(self, split):
            return [{"i": i} for i in range(4)]

    cfg = OmegaConf.create({"tasks": [{"name": "seg"}, {"name": "vqa"}, {"name": "seg"}],
                            "trainer": {"batch_size": 2, "eval_batch_size": None, "num_workers": 0,
                                        "steps_per_epoch": steps_per_epoch},
                            "seed": 0})
    keys = ["seg", "vqa", "seg_2"]
    return cfg, SimpleNamespace(tasks={k: Task() for k in keys}, task_weights={"seg": 3.0, "vqa": 1.0, "seg_2": 2.0})


def test_a_stage_picks_every_entry_of_a_task_name_or_one_entry_by_its_key():
    from medvlsam2.core.config import StageConfig, load_config
    from medvlsam2.core.errors import ConfigError
    from medvlsam2.core.run import _datamodule

    cfg, module = three_entry_run(steps_per_epoch=3)
    chosen = {}
    for tasks in (["seg"], ["seg_2"], ["vqa", "seg_2"]):
        data = _datamodule(cfg, module, StageConfig(name="s", tasks=tasks))
        chosen[tuple(tasks)] = {k: w for k, w in data.weights.items() if w > 0}
    assert chosen[("seg",)] == {"seg": 3.0, "seg_2": 2.0}
    assert chosen[("seg_2",)] == {"seg_2": 2.0}
    assert chosen[("vqa", "seg_2")] == {"vqa": 1.0, "seg_2": 2.0}
    data = "data: {format: m3d_cap, root: reports}"
    entries = f"tasks=[{{name: report_generation, {data}}}, {{name: report_generation, {data}}}]"
    load_config([], [entries, "stages=[{name: s, tasks: [report_generation_2]}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tasks\[0\]: task 'report_generation_3' is not in `tasks`"):
        load_config([], [entries, "stages=[{name: s, tasks: [report_generation_3]}]"])


def test_a_stage_task_weights_override_the_entries_weights_by_key_then_name():
    from medvlsam2.core.config import StageConfig, load_config
    from medvlsam2.core.errors import ConfigError
    from medvlsam2.core.run import _datamodule

    cfg, module = three_entry_run(steps_per_epoch=400)
    stage = StageConfig(name="s", tasks=["seg", "vqa"], task_weights={"seg": 1.0, "seg_2": 6.0})
    data = _datamodule(cfg, module, stage)
    assert data.weights == {"seg": 1.0, "vqa": 1.0, "seg_2": 6.0}
    data.trainer = None
    loader = data.train_dataloader()
    draws = [loader.dataset[b[0]][0] for b in loader.batch_sampler]
    share = {k: draws.count(k) / len(draws) for k in module.tasks}
    assert share["seg_2"] > 0.65 and share["seg"] < 0.2 and share["vqa"] < 0.2  # 6/8, 1/8, 1/8
    data = "data: {format: m3d_cap, root: reports}"
    entries = f"tasks=[{{name: report_generation, {data}}}, {{name: vqa, data: {{format: m3d_vqa, root: q}}}}]"
    load_config([], [entries, "stages=[{name: s, tasks: [report_generation, vqa], task_weights: {vqa: 4}}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.task_weights\.vqa: task 'vqa' is not in this stage's `tasks`"):
        load_config([], [entries, "stages=[{name: s, tasks: [report_generation], task_weights: {vqa: 4}}]"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.task_weights\.vqa: expected a positive number, got 0"):
        load_config([], [entries, "stages=[{name: s, tasks: [vqa], task_weights: {vqa: 0}}]"])
