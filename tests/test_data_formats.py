"""Each data format reads a tiny dataset written in its real layout; bad rows give one clear error."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.registry import PluginHost
from medvlsam2.plugins.tasks.data import load_volume, resolve_under

warnings.filterwarnings("ignore", category=FutureWarning)

VQA_COLUMNS = [
    "Image Path",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer Choice",
    "Answer",
]
REFSEG_COLUMNS = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost(entry_points=False)


def build(host: PluginHost, name: str, **args):
    return host.build("data_formats", name, args)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


# -- layouts ----------------------------------------------------------------------------------
@pytest.fixture
def msd(tmp_path: Path) -> Path:
    """Medical Segmentation Decathlon layout: dataset.json, imagesTr/, labelsTr/, imagesTs/."""
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for name in ("case_001", "case_002"):
        save_nifti(
            tmp_path / "imagesTr" / f"{name}.nii.gz", rng.normal(size=(6, 7, 5)).astype(np.float32), affine
        )
        save_nifti(
            tmp_path / "labelsTr" / f"{name}.nii.gz",
            rng.integers(0, 3, size=(6, 7, 5)).astype(np.uint8),
            affine,
        )
    save_nifti(
        tmp_path / "imagesTs" / "case_003.nii.gz", rng.normal(size=(6, 7, 5)).astype(np.float32), affine
    )
    datalist = {
        "name": "Toy",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [
            {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"},
            {"image": "./imagesTr/case_002.nii.gz", "label": "./labelsTr/case_002.nii.gz"},
        ],
        "test": ["./imagesTs/case_003.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    return tmp_path


@pytest.fixture
def m3d_cap(tmp_path: Path) -> Path:
    for case, text in (("000006", "The liver is enlarged."), ("000007", "No acute findings.")):
        folder = tmp_path / "ct_case" / case
        folder.mkdir(parents=True)
        np.save(folder / "Axial_non_contrast.npy", np.random.rand(1, 4, 8, 8).astype(np.float32))
        (folder / "text.txt").write_text(text)
    datalist = {
        split: [
            {"image": f"ct_case/{c}/Axial_non_contrast.npy", "text": f"ct_case/{c}/text.txt"} for c in cases
        ]
        for split, cases in (("train", ["000006"]), ("validation", ["000007"]), ("test", ["000007"]))
    }
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(datalist))
    return tmp_path


@pytest.fixture
def m3d_vqa(tmp_path: Path) -> Path:
    folder = tmp_path / "ct_quizze" / "001234"
    folder.mkdir(parents=True)
    np.save(folder / "Axial_C__portal_venous_phase.npy", np.random.rand(1, 4, 8, 8).astype(np.float32))
    image = "ct_quizze/001234/Axial_C__portal_venous_phase.npy"
    rows = [
        [
            image,
            "1",
            "Which plane is this image in?",
            "Axial",
            "Sagittal",
            "Coronal",
            "Oblique",
            "A",
            "Axial",
        ],
        [image, "3", "Which organ is abnormal?", "Spleen", "Kidney", "Liver", "Lung", "C", "Liver"],
    ]
    write_csv(tmp_path / "M3D_VQA_train.csv", VQA_COLUMNS, rows)
    return tmp_path


@pytest.fixture
def m3d_seg(tmp_path: Path) -> Path:
    """M3D_Seg/0000/0000.json, 0000/<case>/image.npy, mask_(C, H, W, D).npz, term_dictionary.json."""
    code = "0000"
    mask = np.zeros((2, 5, 6, 4), dtype=np.int32)
    mask[0, 1:3, 1:4, 1:3] = 1
    mask[1, 3:5, 2:5, 0:2] = 1
    case = tmp_path / code / "kidney_case1"
    case.mkdir(parents=True)
    np.save(case / "image.npy", np.random.rand(1, 5, 6, 4).astype(np.float32))
    name = "mask_" + str(mask.shape)
    sparse.save_npz(case / name, sparse.csr_matrix(mask.reshape(mask.shape[0], -1)))
    dataset = {
        "name": "0000 Dataset",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "kidney", "2": "kidney tumor"},
        "train": [{"image": f"{code}/kidney_case1/image.npy", "label": f"{code}/kidney_case1/{name}.npz"}],
        "test": [],
    }
    (tmp_path / code / f"{code}.json").write_text(json.dumps(dataset))
    terms = {
        "kidney": ["Bean-shaped organ filtering blood."],
        "kidney tumor": ["Abnormal growth in the kidney."],
        "liver": ["x"],
    }
    (tmp_path / "term_dictionary.json").write_text(json.dumps(terms))
    return tmp_path


@pytest.fixture
def m3d_refseg(tmp_path: Path) -> Path:
    mask = np.zeros((6, 7, 5), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    mask[4:6, 4:6, 2:4] = 2
    save_nifti(tmp_path / "s0000" / "ct.nii.gz", np.random.rand(6, 7, 5).astype(np.float32))
    save_nifti(tmp_path / "s0000" / "mask.nii.gz", mask)
    (tmp_path / "s0000" / "text.json").write_text(json.dumps({"1": "lesion", "2": "cyst"}))
    rows = [
        ["s0000/ct.nii.gz", "s0000/mask.nii.gz", "1", "0", "Where is the lesion?", "It is here [SEG]."],
        ["s0000/ct.nii.gz", "s0000/mask.nii.gz", "2", "1", "Segment the cyst.", "Sure, [SEG]."],
    ]
    write_csv(tmp_path / "M3D_RefSeg_train.csv", REFSEG_COLUMNS, rows)
    return tmp_path


# -- round trips ------------------------------------------------------------------------------
def test_registered(host: PluginHost) -> None:
    assert host.names("data_formats") == ["m3d_cap", "m3d_refseg", "m3d_seg", "m3d_vqa", "nifti_json"]


def test_nifti_json_round_trip(host: PluginHost, msd: Path) -> None:
    reader = build(host, "nifti_json", root=str(msd))
    assert len(reader) == 2
    sample = reader[0]
    assert sample["image"] == str(msd / "imagesTr" / "case_001.nii.gz")
    assert sample["label"] == str(msd / "labelsTr" / "case_001.nii.gz")
    assert sample["labels"] == {1: "liver", 2: "tumour"}
    assert sample["id"] == "case_001"
    image = load_volume(sample)
    expected = nib.load(sample["image"])
    np.testing.assert_allclose(image.numpy(), expected.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(image.affine), expected.affine)
    label = load_volume(sample, "label")
    np.testing.assert_array_equal(label.numpy(), np.asarray(nib.load(sample["label"]).dataobj))
    test = build(host, "nifti_json", root=str(msd), split="test")
    assert test[0]["label"] is None and test[0]["id"] == "case_003"
    assert reader.preprocess_config().intensity == "ct"


def test_nifti_json_reads_nrrd(host: PluginHost, tmp_path: Path) -> None:
    import nrrd

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nrrd.write(
        str(tmp_path / "a.nrrd"),
        data,
        {
            "space": "left-posterior-superior",
            "space directions": np.diag([1.0, 2.0, 3.0]),
            "space origin": np.zeros(3),
        },
    )
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nrrd"}]}))
    volume = load_volume(build(host, "nifti_json", root=str(tmp_path))[0])
    np.testing.assert_array_equal(volume.numpy(), data)
    np.testing.assert_allclose(np.diag(np.asarray(volume.affine))[:3], [-1.0, -2.0, 3.0])  # LPS -> RAS


def test_m3d_cap_round_trip(host: PluginHost, m3d_cap: Path) -> None:
    train = build(host, "m3d_cap", root=str(m3d_cap))
    assert [s["text"] for s in train] == ["The liver is enlarged."]
    assert train[0]["id"] == "ct_case/000006/Axial_non_contrast"
    assert load_volume(train[0]).shape == (4, 8, 8)
    val = build(host, "m3d_cap", root=str(m3d_cap), split="validation")
    assert val[0]["text"] == "No acute findings."


def test_m3d_vqa_round_trip(host: PluginHost, m3d_vqa: Path) -> None:
    reader = build(host, "m3d_vqa", root=str(m3d_vqa))
    assert len(reader) == 2
    second = reader[1]
    assert second["answer_choice"] == "C" and second["closed_answer"] == "C. Liver"
    assert second["choices"] == {"A": "Spleen", "B": "Kidney", "C": "Liver", "D": "Lung"}
    assert second["question_type"] == "organ" and reader[0]["question_type"] == "plane"
    assert second["closed_question"].endswith("Choices: A. Spleen B. Kidney C. Liver D. Lung")


def test_m3d_seg_round_trip(host: PluginHost, m3d_seg: Path) -> None:
    reader = build(host, "m3d_seg", root=str(m3d_seg), dataset="0000")
    sample = reader[0]
    assert sample["mask_shape"] == (2, 5, 6, 4)
    assert sample["labels"] == {1: "kidney", 2: "kidney tumor"}
    assert (
        sample["terms"]["kidney"] == ["Bean-shaped organ filtering blood."] and "liver" not in sample["terms"]
    )
    mask = load_volume(sample, "label").numpy()
    assert mask.shape == (2, 5, 6, 4)
    assert mask[0, 1:3, 1:4, 1:3].all() and mask[0].sum() == 2 * 3 * 2
    assert mask[1, 3:5, 2:5, 0:2].all() and mask[1].sum() == 2 * 3 * 2
    assert load_volume(sample).shape == (5, 6, 4)


def test_m3d_refseg_round_trip(host: PluginHost, m3d_refseg: Path) -> None:
    reader = build(host, "m3d_refseg", root=str(m3d_refseg))
    assert [s["mask_id"] for s in reader] == [1, 2]
    assert reader[0]["question"] == "Where is the lesion?" and reader[1]["question_type"] == "1"
    second = load_volume(reader[1], "label").numpy()
    assert second.sum() == 8 and second[4:6, 4:6, 2:4].all()


# -- bad paths and missing columns ------------------------------------------------------------
def test_path_escape_is_refused(host: PluginHost, m3d_vqa: Path) -> None:
    outside = m3d_vqa.parent / "outside.npy"
    np.save(outside, np.zeros((2, 2, 2)))
    for bad in ("../outside.npy", str(outside)):
        write_csv(
            m3d_vqa / "M3D_VQA_train.csv", VQA_COLUMNS, [[bad, "1", "Q?", "a", "b", "c", "d", "A", "a"]]
        )
        with pytest.raises(
            InputError, match=r"M3D_VQA_train.csv row 1: Image Path: path .* outside the data root"
        ):
            build(host, "m3d_vqa", root=str(m3d_vqa))
    reader = build(host, "m3d_vqa", root=str(m3d_vqa), allow_outside_root=True)
    assert reader[0]["image"] == str(outside)


def test_resolve_under_collapses_dotdot(tmp_path: Path) -> None:
    assert resolve_under(tmp_path, "a/../b.nii", where="x") == tmp_path / "b.nii"
    with pytest.raises(InputError, match="outside the data root"):
        resolve_under(tmp_path, "a/../../b.nii", where="x")


def test_missing_column_names_file(host: PluginHost, m3d_vqa: Path) -> None:
    header = [c for c in VQA_COLUMNS if c != "Answer Choice"]
    write_csv(m3d_vqa / "M3D_VQA_train.csv", header, [["x.npy", "1", "Q", "a", "b", "c", "d", "a"]])
    with pytest.raises(InputError, match=r"M3D_VQA_train.csv: column 'Answer Choice' missing"):
        build(host, "m3d_vqa", root=str(m3d_vqa))


def test_short_row_names_row(host: PluginHost, m3d_vqa: Path) -> None:
    image = "ct_quizze/001234/Axial_C__portal_venous_phase.npy"
    good = [image, "1", "Q?", "a", "b", "c", "d", "A", "a"]
    write_csv(m3d_vqa / "M3D_VQA_train.csv", VQA_COLUMNS, [good] * 6 + [good[:7]])
    with pytest.raises(InputError, match=r"M3D_VQA_train.csv row 7: column 'Answer Choice' missing"):
        build(host, "m3d_vqa", root=str(m3d_vqa))
    reader = build(host, "m3d_vqa", root=str(m3d_vqa), skip_bad=True)
    assert len(reader) == 6 and len(reader.skipped) == 1 and "row 7" in reader.skipped[0]


def test_missing_file_names_row(host: PluginHost, m3d_refseg: Path) -> None:
    write_csv(
        m3d_refseg / "M3D_RefSeg_train.csv",
        REFSEG_COLUMNS,
        [["s0001/ct.nii.gz", "s0000/mask.nii.gz", "1", "0", "Q", "A"]],
    )
    with pytest.raises(
        InputError, match=r"M3D_RefSeg_train.csv row 1: Image file not found: .*s0001/ct.nii.gz"
    ):
        build(host, "m3d_refseg", root=str(m3d_refseg))


def test_missing_json_key_names_entry(host: PluginHost, m3d_cap: Path) -> None:
    (m3d_cap / "M3D_Cap.json").write_text(
        json.dumps({"train": [{"image": "ct_case/000006/Axial_non_contrast.npy"}]})
    )
    with pytest.raises(InputError, match=r"M3D_Cap.json train\[0\]: key 'text' missing"):
        build(host, "m3d_cap", root=str(m3d_cap))


def test_bad_mask_name_and_split(host: PluginHost, m3d_seg: Path, msd: Path) -> None:
    data = json.loads((m3d_seg / "0000" / "0000.json").read_text())
    data["train"][0]["label"] = "0000/kidney_case1/image.npy"
    (m3d_seg / "0000" / "0000.json").write_text(json.dumps(data))
    with pytest.raises(
        InputError, match=r"0000.json train\[0\]: label 'image.npy' does not encode its shape"
    ):
        build(host, "m3d_seg", root=str(m3d_seg))
    with pytest.raises(InputError, match="split 'validaton' missing"):
        build(host, "nifti_json", root=str(msd), split="validaton")


def test_unknown_option_is_config_error(host: PluginHost, msd: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'allow_outside_root'"):
        build(host, "nifti_json", root=str(msd), allow_outside_rot=True)


# -- fuzzing: malformed rows give InputError and nothing else -------------------------------------
cell_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", "..", "../x.npy", "/etc/passwd", "nan", "-1", "1.5", "E", "s0000/ct.nii.gz", "a,b", '"']
    ),
)
row_strategy = st.lists(st.lists(cell_text, max_size=10), max_size=4)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_input_errors(build_reader) -> None:
    try:
        reader = build_reader()
    except InputError:
        return
    for sample in reader:
        assert isinstance(sample["image"], str)


@FUZZ
@given(rows=row_strategy, drop=st.sampled_from([None, *VQA_COLUMNS]))
def test_fuzz_vqa_rows(host: PluginHost, m3d_vqa: Path, rows: list[list[str]], drop: str | None) -> None:
    header = [c for c in VQA_COLUMNS if c != drop]
    write_csv(m3d_vqa / "M3D_VQA_train.csv", header, rows)
    _only_input_errors(lambda: build(host, "m3d_vqa", root=str(m3d_vqa)))


@FUZZ
@given(rows=row_strategy)
def test_fuzz_refseg_rows(host: PluginHost, m3d_refseg: Path, rows: list[list[str]]) -> None:
    write_csv(m3d_refseg / "M3D_RefSeg_train.csv", REFSEG_COLUMNS, rows)
    _only_input_errors(lambda: build(host, "m3d_refseg", root=str(m3d_refseg)))


@FUZZ
@given(
    raw=st.one_of(
        json_value, st.dictionaries(st.sampled_from(["train", "labels", "test"]), json_value, max_size=3)
    )
)
def test_fuzz_json_readers(host: PluginHost, m3d_cap: Path, raw: object) -> None:
    text = json.dumps(raw)
    (m3d_cap / "M3D_Cap.json").write_text(text)
    _only_input_errors(lambda: build(host, "m3d_cap", root=str(m3d_cap)))
    (m3d_cap / "dataset.json").write_text(json.dumps({"training": raw, "labels": raw}))
    _only_input_errors(lambda: build(host, "nifti_json", root=str(m3d_cap)))
    (m3d_cap / "0000").mkdir(exist_ok=True)
    (m3d_cap / "0000" / "0000.json").write_text(text)
    _only_input_errors(lambda: build(host, "m3d_seg", root=str(m3d_cap), term_dictionary=None))
    (m3d_cap / "M3D_Cap.json").write_bytes(text.encode()[: max(0, len(text) // 2)])
    _only_input_errors(lambda: build(host, "m3d_cap", root=str(m3d_cap)))
