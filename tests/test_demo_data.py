"""The demo dataset: real layouts that the readers load, ground truth consistent across every file."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medvlsam2.core.errors import InputError
from medvlsam2.core.registry import PluginHost
from medvlsam2.plugins.tasks.data import demo as demo_data
from medvlsam2.plugins.tasks.data import load_volume

warnings.filterwarnings("ignore", category=FutureWarning)

NUM_CASES, NUM_CT = 4, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    manifest = demo_data.build_demo_data(out, num_cases=NUM_CASES, num_ct_cases=NUM_CT, seed=0)
    assert manifest == out / "demo.json"
    return out


@pytest.fixture(scope="module")
def manifest(built: Path) -> dict[str, Any]:
    return json.loads((built / "demo.json").read_text())


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def cases(built: Path, key: str) -> list[dict[str, Any]]:
    return json.loads((built / key / "cases.json").read_text())["cases"]


def case_of(path: str) -> str:
    return re.search(r"(brain|ct)_\d{3}", path).group(0)


def dominant(lesions: list[dict[str, Any]]) -> dict[str, Any] | None:
    ranked = sorted(lesions, key=lambda lesion: -lesion["voxels"])
    if len(ranked) == 1 or (len(ranked) > 1 and ranked[0]["voxels"] >= 1.2 * ranked[1]["voxels"]):
        return ranked[0]
    return None


# -- layout -----------------------------------------------------------------------------------
def test_manifest_lists_existing_files_and_counts(built: Path, manifest: dict[str, Any]) -> None:
    assert set(manifest["datasets"]) == {"brain", "ct"}
    total_lesions = 0
    for key, entry in manifest["datasets"].items():
        root = built / entry["root"]
        files = entry["files"]
        for name in (files["datalist"], files["m3d_cap"], files["interactive"], files["grounding"], files["term_dictionary"],
                     files["ground_truth"], *files["m3d_vqa"].values(), *files["m3d_refseg"].values()):
            assert (root / name).is_file(), name
        assert entry["counts"]["cases"] == (NUM_CASES if key == "brain" else NUM_CT)
        datalist = json.loads((root / "dataset.json").read_text())
        assert datalist["labels"] == entry["labels"] and datalist["labels"]["0"] == "background"
        assert entry["labels"][str(entry["lesion_label"])] == "lesion"
        assert set(entry["large_labels"]) <= set(entry["labels"].values())
        for item in datalist["training"] + datalist["validation"] + datalist["test"]:
            for column in ("image", "label", "lesions"):
                assert (root / item[column]).is_file()
        total_lesions += entry["counts"]["lesions"]
        assert sum(len(c["lesions"]) for c in cases(built, key)) == entry["counts"]["lesions"]
    assert total_lesions > 0, "the small build must contain lesions for the checks below to mean anything"


def test_every_reader_loads_every_split(built: Path, manifest: dict[str, Any]) -> None:
    host = PluginHost(entry_points=False)
    for key, entry in manifest["datasets"].items():
        for split, readers in entry["readers"].items():
            for name, data in readers.items():
                args = {k: v for k, v in data.items() if k != "format"}
                args["root"] = str(built / data["root"])
                reader = host.build("data_formats", data["format"], args)
                expected = {
                    "nifti_json": entry["counts"][split],
                    "m3d_cap": entry["counts"][split],
                    "m3d_vqa": entry["counts"]["vqa_rows"][split],
                    "m3d_refseg": entry["counts"]["refseg_rows"][split],
                }[name]
                assert len(reader) == expected, (key, split, name)
                if not len(reader):
                    continue
                sample = reader[0]
                assert tuple(load_volume(sample).shape) == tuple(entry["shape"])
                if name == "m3d_cap":
                    assert "Impression:" in sample["text"]
                if name == "m3d_vqa":
                    assert sample["closed_answer"] == f"{sample['answer_choice']}. {sample['answer']}"
                if name in ("nifti_json", "m3d_refseg"):
                    assert int(load_volume(sample, "label").max()) >= 1
                    assert reader.preprocess_config().intensity == entry["preprocess_preset"]


# -- ground truth -----------------------------------------------------------------------------
def test_labels_named_and_sides_anatomically_correct(built: Path, manifest: dict[str, Any]) -> None:
    for key, entry in manifest["datasets"].items():
        names = {int(k): v for k, v in entry["labels"].items()}
        for case in cases(built, key):
            image = nib.load(str(built / key / case["image"]))
            labels = array(built / key / case["label"])
            assert set(np.unique(labels)) <= set(names), case["case"]
            spacing = image.header.get_zooms()
            assert np.allclose(spacing, entry["spacing_mm"]) and np.allclose(image.affine[:3, :3], np.diag(spacing))
            for value, name in names.items():
                if name.startswith(("left ", "right ")) and (labels == value).sum() > 10:
                    x = (image.affine @ np.append(np.argwhere(labels == value).mean(axis=0), 1.0))[0]
                    assert (x < 0) == name.startswith("left "), f"{name} centroid x={x:.1f} mm (RAS: left is x < 0)"


def test_lesions_lie_inside_their_structure(built: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["datasets"]["brain"]
    shape = tuple(entry["shape"])
    source = demo_data.load_brain_source(shape)
    affine = demo_data.brain_grid(shape, source)
    checked = 0
    for i, case in enumerate(cases(built, "brain")):
        regenerated = demo_data.make_brain_case(source, shape, affine, np.random.default_rng([0, 0, i]))
        assert np.array_equal(regenerated.image, array(built / "brain" / case["image"]))
        instances = array(built / "brain" / case["lesions_map"])
        labels = array(built / "brain" / case["label"])
        assert np.array_equal(regenerated.instances, instances)
        assert set(np.unique(instances)) == {0, *[lesion["index"] for lesion in case["lesions"]]}
        for lesion in case["lesions"]:
            mask = instances == lesion["index"]
            assert np.all(regenerated.anatomy[mask] == lesion["structure_label"])
            assert np.all(labels[mask] == entry["lesion_label"])
            assert entry["labels"][str(lesion["structure_label"])] == lesion["structure"]
            assert demo_data.bounding_box(mask) == lesion["bbox_voxel"] and mask.sum() == lesion["voxels"]
            assert lesion["size_mm"] == round(max(lesion["extent_mm"]))
            brighter = lesion["mean_value"] > lesion["reference_value"]
            assert brighter == (lesion["intensity"] == "hyperintense")
            checked += 1
        assert set(np.unique(labels[instances == 0])) <= set(range(entry["lesion_label"]))
    assert checked > 0


def test_reports_mention_each_lesion(built: Path) -> None:
    for key, spec in (("brain", demo_data.BRAIN), ("ct", demo_data.CT)):
        for case in cases(built, key):
            report = (built / key / case["report"]).read_text()
            if not case["lesions"]:
                assert "no focal" in report.lower() and "no acute abnormality" in report
            for lesion in case["lesions"]:
                assert lesion["structure"] in report and f"{lesion['size_mm']} mm" in report
                assert lesion["intensity"] in report
                structure = next(s for s in spec.structures if s.name == lesion["structure"])
                if structure.name != structure.base:
                    assert f"{lesion['side']} {structure.base}" in report
            if "phase" in case:
                assert f"{case['phase']} phase" in report


def test_vqa_answers_match_letters_and_truth(built: Path, manifest: dict[str, Any]) -> None:
    for key, entry in manifest["datasets"].items():
        truth = {c["image"]: c for c in cases(built, key)}
        for split, name in entry["files"]["m3d_vqa"].items():
            for row in read_rows(built / key / name):
                choices = [row[f"Choice {c}"] for c in "ABCD"]
                assert len(set(choices)) == 4 and row[f"Choice {row['Answer Choice']}"] == row["Answer"]
                case = truth[row["Image Path"]]
                assert case["split"] == split
                lesions = case["lesions"]
                if row["Question Type"] == "count":
                    assert row["Answer"] == demo_data.COUNT_WORDS[len(lesions)]
                elif row["Question Type"] == "presence":
                    where = re.match(r"Is there a lesion in the (.+)\?", row["Question"]).group(1)
                    hit = [lesion for lesion in lesions if lesion["structure"] == where]
                    assert row["Answer"] == (f"Yes, a {hit[0]['intensity']} lesion" if hit else "No")
                elif row["Question Type"] == "structure":
                    assert row["Answer"] == dominant(lesions)["structure"]
                elif row["Question Type"] == "size":
                    where = re.match(r"How large is the lesion in the (.+)\?", row["Question"]).group(1)
                    size = next(lesion["size_mm"] for lesion in lesions if lesion["structure"] == where)
                    spec = demo_data.BRAIN if key == "brain" else demo_data.CT
                    assert row["Answer"] == spec.size_category(size)
                elif row["Question Type"] == "side":
                    sides = {lesion["side"] for lesion in lesions} - {"midline"}
                    expected = "midline" if not sides else "both sides" if len(sides) == 2 else sides.pop()
                    assert row["Answer"] == expected
                elif row["Question Type"] == "phase":
                    assert row["Answer"] == case["phase"]


def test_referring_masks_are_what_the_expression_says(built: Path, manifest: dict[str, Any]) -> None:
    seen: set[str] = set()
    for key, entry in manifest["datasets"].items():
        by_name = {v: int(k) for k, v in entry["labels"].items()}
        truth = {c["image"]: c for c in cases(built, key)}
        for name in entry["files"]["m3d_refseg"].values():
            for row in read_rows(built / key / name):
                case = truth[row["Image"]]
                assert row["Mask"] == case["refseg_mask"]
                target = array(built / key / row["Mask"]) == int(row["Mask_ID"])
                labels = array(built / key / case["label"])
                instances = array(built / key / case["lesions_map"])
                lesions = case["lesions"]
                qtype, question = row["Question_Type"], row["Question"]
                assert target.any(), question
                seen.add(qtype)
                if qtype == "lesion_location":
                    where = re.search(r"the lesion in the (.+?)[.?]", question).group(1)
                    lesion = next(lesion for lesion in lesions if lesion["structure"] == where)
                    expected = instances == lesion["index"]
                elif qtype == "containing_structure":
                    expected = labels == dominant(lesions)["structure_label"]
                elif qtype in ("same_side", "contralateral"):
                    home = dominant(lesions)
                    side = home["side"] if qtype == "same_side" else {"left": "right", "right": "left"}[home["side"]]
                    base = re.search(r"the (.+?) on the", question).group(1)
                    expected = labels == by_name[f"{side} {base}"]
                elif qtype == "size_relation":
                    ranked = sorted(lesions, key=lambda lesion: -lesion["voxels"])
                    pick = ranked[0] if ("larger" in question or "largest" in question) else ranked[-1]
                    expected = instances == pick["index"]
                elif qtype == "intensity":
                    kind = re.search(r"the (\w+) lesion", question).group(1)
                    expected = instances == next(lesion["index"] for lesion in lesions if lesion["intensity"] == kind)
                else:
                    structure = re.match(r"It is the (.+)\.", row["Answer"]).group(1)
                    expected = labels == by_name[structure]
                assert np.array_equal(target, expected), (key, case["case"], question)
    assert {"lesion_location", "containing_structure", "description"} <= seen


def test_points_and_boxes_fit_their_targets(built: Path, manifest: dict[str, Any]) -> None:
    for key, entry in manifest["datasets"].items():
        root = built / key
        prompts = json.loads((root / "interactive.json").read_text())
        grounding = json.loads((root / "grounding.json").read_text())
        shape = entry["shape"]
        for split in demo_data.SPLITS:
            for item in prompts[split]:
                assert item["case"] in entry["splits"][split]
                for target in item["targets"]:
                    mask = array(root / target["mask"]) == target["value"]
                    assert mask.any() and target["box"] == demo_data.bounding_box(mask)
                    assert all(mask[tuple(p)] for p in target["points"]) and len(target["points"]) >= 1
                    assert not any(mask[tuple(p)] for p in target["negative_points"])
            for item in grounding[split]:
                mask = array(root / item["target"]["mask"]) == item["target"]["value"]
                box = item["box_voxels"]
                assert box == demo_data.bounding_box(mask)
                lo, hi = np.array(item["box"][:3]) * shape, np.array(item["box"][3:]) * shape
                assert np.allclose(lo, box[:3], atol=0.01) and np.allclose(hi, np.array(box[3:]) + 1, atol=0.01)
                assert 0 <= min(item["box"]) and max(item["box"]) <= 1 and item["text"]


def test_ct_is_in_plausible_hounsfield_units(built: Path, manifest: dict[str, Any]) -> None:
    names = {v: int(k) for k, v in manifest["datasets"]["ct"]["labels"].items()}
    for case in cases(built, "ct"):
        image = array(built / "ct" / case["image"])
        labels = array(built / "ct" / case["label"])
        instances = array(built / "ct" / case["lesions_map"])
        assert image.dtype == np.int16 and image.min() >= -1024 and image.max() <= 3071
        assert abs(float(np.median(image[:3, :3, :])) + 1000) < 40, "air outside the body"
        mean = {name: float(image[labels == value].mean()) for name, value in names.items() if (labels == value).any()}
        assert 35 < mean["liver"] < 130 and mean["vertebra"] > 250
        if case["phase"] == "arterial":
            assert mean["aorta"] > 200
        if case["phase"] == "non-contrast":
            assert mean["aorta"] < 80
        for lesion in case["lesions"]:
            inner = image[instances == lesion["index"]].mean()
            organ = mean[lesion["structure"]]
            assert (inner > organ) == (lesion["intensity"] == "hyperdense"), (lesion, organ)


# -- splits, determinism, reuse ---------------------------------------------------------------
def test_splits_are_disjoint_and_recorded_in_every_file(built: Path, manifest: dict[str, Any]) -> None:
    for key, entry in manifest["datasets"].items():
        root = built / key
        splits = entry["splits"]
        members = [set(splits[s]) for s in demo_data.SPLITS]
        assert sum(len(m) for m in members) == len(set().union(*members)) == entry["counts"]["cases"]
        assert splits["train"] and splits["test"]
        datalist = json.loads((root / "dataset.json").read_text())
        cap = json.loads((root / "M3D_Cap.json").read_text())
        for split in demo_data.SPLITS:
            allowed = set(splits[split])
            referenced = {case_of(i["image"]) for i in datalist[demo_data.MSD_SPLIT[split]]}
            referenced |= {case_of(i["image"]) for i in cap[split]}
            referenced |= {case_of(r["Image Path"]) for r in read_rows(root / entry["files"]["m3d_vqa"][split])}
            referenced |= {case_of(r["Image"]) for r in read_rows(root / entry["files"]["m3d_refseg"][split])}
            assert referenced <= allowed, (key, split, referenced - allowed)
        assert all(i["image"].startswith("./imagesTs/") for i in datalist["test"])
        assert not any("imagesTs/" in i["image"] for i in datalist["training"] + datalist["validation"])


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = demo_data.build_demo_data(tmp_path / "a", num_cases=2, num_ct_cases=1, seed=3).parent
    b = demo_data.build_demo_data(tmp_path / "b", num_cases=2, num_ct_cases=1, seed=3).parent
    c = demo_data.build_demo_data(tmp_path / "c", num_cases=2, num_ct_cases=1, seed=4).parent
    assert _digest(a) == _digest(b)
    assert _digest(a)["brain/imagesTr/brain_000.nii.gz"] != _digest(c).get("brain/imagesTr/brain_000.nii.gz")


def test_reuses_a_build_and_refuses_foreign_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        demo_data.build_demo_data(foreign, num_cases=2, num_ct_cases=0)
    manifest = demo_data.build_demo_data(tmp_path / "d", num_cases=2, num_ct_cases=0)
    stamp = manifest.stat().st_mtime_ns
    assert demo_data.build_demo_data(tmp_path / "d", num_cases=2, num_ct_cases=0).stat().st_mtime_ns == stamp
    assert "rebuilding" not in caplog.text
    rebuilt = demo_data.build_demo_data(tmp_path / "d", num_cases=3, num_ct_cases=0)
    assert json.loads(rebuilt.read_text())["datasets"]["brain"]["counts"]["cases"] == 3
    assert f"demo data: rebuilding {tmp_path / 'd'} (num_cases 2 -> 3)" in caplog.text  # a different build is said so
    assert not (tmp_path / "d" / "ct").exists()


def test_demo_limits_benchmark_trains_specialists_on_train_and_scores_validation(built: Path, tmp_path: Path) -> None:
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_limits.py"))
    out = tmp_path / "limits.json"
    result = script["main"](["--data", str(built), "--size", "4", "32", "32", "--structure-steps", "2",
                             "--lesion-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    info = json.loads((built / "demo.json").read_text())["datasets"]["brain"]
    assert result["train_cases"] == len(info["splits"]["train"])
    assert result["validation_cases"] == len(info["splits"]["validation"])
    assert set(result["structures"]["dice"]) == set(info["large_labels"])
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in result["structures"]["dice"].values())
    assert result["visibility"]["voxels_in_volume"] == 4 * 32 * 32
    assert 0 <= result["visibility"]["cases_whose_lesion_vanishes"] <= result["validation_cases"]
    assert result["lesion"]["augmented"] is False
    for key in ("localised", "train_localised"):
        hit, cases = result["lesion"][key]
        assert 0 <= hit <= cases
    assert result["lesion"]["localised"][1] == result["lesion"]["validation_cases_with_lesion"]
    augmented = script["main"](["--data", str(built), "--size", "4", "32", "32", "--structure-steps", "1",
                                "--lesion-steps", "2", "--augment", "--anti-aliasing"])
    assert augmented["lesion"]["augmented"] is True
    assert (result["anti_aliasing"], augmented["anti_aliasing"]) == (False, True)
    assert augmented["lesion"]["train_localised"][1] == result["lesion"]["train_localised"][1]
    with pytest.raises(SystemExit, match="demo.json not found; build one with"):
        script["main"](["--data", str(tmp_path)])


def test_demo_limits_augment_moves_image_and_label_together_and_localised_counts_hits() -> None:
    import itertools
    import runpy

    import torch

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_limits.py"))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 3, 5, 6)
    y = (x > 0.7).float()  # the label is a function of the image, so the pair must stay aligned
    flips = set()
    for _ in range(16):
        xa, ya = script["augment"](x, y, generator)
        assert xa.shape == x.shape and ya.shape == y.shape
        # the intensity change is increasing per volume, so the label still marks each volume's brightest voxels
        k = y.flatten(1).sum(1).long()
        for case in range(len(x)):
            brightest = xa[case].flatten().topk(int(k[case])).indices
            assert set(brightest.tolist()) == set(ya[case].flatten().nonzero()[:, 0].tolist())
        span = xa.flatten(1).amax(1) - xa.flatten(1).amin(1)
        scale = span / (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        assert torch.all((scale > 0.849) & (scale < 1.151))
        flips.update(axes for axes in itertools.chain.from_iterable(itertools.combinations((2, 3, 4), n) for n in range(4))
                     if torch.equal(ya.flip(axes) if axes else ya, y))
    assert len(flips) > 1  # the flips vary from batch to batch
    truth = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    truth[0, 0, 0, 0] = True  # case 0: lesion where the top voxel is
    truth[1, 1, 1, 1] = True  # case 1: lesion elsewhere
    prob = torch.zeros(3, 2, 2, 2)
    prob[:, 0, 0, 0] = 0.9
    assert script["localised"](prob, truth) == [1, 2]  # case 2 has no lesion and is not counted
