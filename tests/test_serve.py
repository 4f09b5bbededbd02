"""``medvlsam2 serve``: the HTTP API and the page in headless Chromium, on a tiny exported model.

One model (configs/tiny.yaml, one training step) is exported once; one server process serves
every test here, as a user would run it. The browser test needs Debian's ``chromium`` and
``chromium-driver`` (see docs/serve.md).
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medvlsam2.core.config import load_config
from medvlsam2.core.export import export
from medvlsam2.core.run import fit

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CASE = "brain/brain_000"


# -- fixtures: one exported tiny model, one server ----------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model with every task, trained one step and exported; and its demo data."""
    root = tmp_path_factory.mktemp("serve")
    override = root / "fast.yaml"
    override.write_text(
        f"vars: {{demo_data: {root / 'demo'}}}\n"
        f"output_dir: {root / 'runs'}\n"
        "trainer: {test_after_fit: false, enable_progress_bar: false}\n"
        "stages:\n"
        "  - {name: joint, tasks: [report_generation, vqa, semantic_seg, referring_seg, interactive_seg],\n"
        "     trainable: [lora, projector, seg_projector, decoder, heads], max_steps: 1, lr: 1.0e-3}\n"
    )
    folder = fit(load_config([ROOT / "configs" / "tiny.yaml", override]))
    return export(folder / "checkpoints" / "joint" / "last.ckpt", root / "export"), root / "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    export_dir, demo = model
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medvlsam2", "serve", "--model", str(export_dir), "--port", str(port), "--demo-data", str(demo)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=5).read()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def call(url: str, method: str = "GET", body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or bytes) of one request; 4xx/5xx come back rather than raise."""
    data, headers = None, {}
    if raw is not None:
        data, headers = raw, {"Content-Type": "application/octet-stream"}
    elif body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as res:
            status, payload, kind = res.status, res.read(), res.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, payload, kind = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, json.loads(payload) if "json" in kind else payload


def ok(url: str, method: str = "GET", body: Any = None, raw: bytes | None = None) -> Any:
    status, payload = call(url, method, body, raw)
    assert status == 200, payload
    return payload


def open_demo(server: str, case: str = CASE) -> dict[str, Any]:
    return ok(f"{server}/api/sessions", "POST", {"case": case})


def demo_file(model: tuple[Path, Path], case: str = CASE) -> Path:
    key, name = case.split("/")
    return next((model[1] / key).glob(f"images*/{name}.nii.gz"))


def nifti_of(payload: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(payload))


# -- the HTTP API --------------------------------------------------------------------------------
def test_info_offers_the_models_tasks_and_demo_cases(server):
    info = ok(f"{server}/api/info")
    assert info["tasks"] == dict.fromkeys(("interactive_seg", "semantic_seg", "referring_seg", "vqa", "report_generation"), True)
    assert CASE in info["demo_cases"] and any(c.startswith("ct/") for c in info["demo_cases"])
    page = ok(f"{server}/").decode()
    assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "")  # every asset is local


def test_volume_comes_back_voxel_for_voxel_with_its_geometry(server, model):
    meta = open_demo(server)
    image = nib.load(demo_file(model))
    assert meta["shape"] == list(image.shape)
    assert np.allclose(meta["affine"], image.affine) and np.allclose(meta["spacing"], image.header.get_zooms())
    raw = ok(f"{server}/api/sessions/{meta['session']}/volume")
    values = np.frombuffer(raw, dtype=np.dtype(meta["volume_dtype"]).newbyteorder("<")).reshape(image.shape)
    assert np.array_equal(values, np.asarray(image.dataobj).astype(values.dtype))
    ct = open_demo(server, "ct/ct_000")
    assert ct["modality"] == "CT" and meta["modality"] == "MR" and ct["volume_dtype"] == "int16"


def test_box_segments_and_the_download_has_the_inputs_grid(server, model):
    meta = open_demo(server)
    sid, image = meta["session"], nib.load(demo_file(model))
    box = [12, 16, 27, 34, 46, 27]
    state = ok(f"{server}/api/sessions/{sid}/box", "POST", {"box": box})
    assert state["box"] == box and state["result"]["task"] == "interactive_seg"
    label_map = np.frombuffer(ok(f"{server}/api/sessions/{sid}/mask"), dtype=np.uint8).reshape(image.shape)
    assert int((label_map > 0).sum()) == state["result"]["mask_voxels"] > 0
    # The box lies on one axial slice, which the model's box bounds in depth: the mask covers
    # that slice and no slice further than one model slice (56 / 16 file slices) away.
    slices = np.nonzero(label_map.any(axis=(0, 1)))[0]
    step = image.shape[2] / 16  # model depth 16 (configs/tiny.yaml)
    assert 27 in slices and slices.min() >= 27 - step and slices.max() <= 27 + step
    mask = nifti_of(ok(f"{server}/api/sessions/{sid}/mask.nii.gz"))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert np.array_equal(np.asarray(mask.dataobj), label_map)


def test_points_undo_and_clear(server):
    sid = open_demo(server)["session"]
    first = ok(f"{server}/api/sessions/{sid}/points", "POST", {"point": [24, 32, 30], "label": 1})
    assert first["points"] == [[24, 32, 30, 1]] and first["result"]["mask_voxels"] > 0
    second = ok(f"{server}/api/sessions/{sid}/points", "POST", {"point": [5, 5, 30], "label": 0})
    assert second["points"] == [[24, 32, 30, 1], [5, 5, 30, 0]] and second["result"]["version"] != first["result"]["version"]
    undone = ok(f"{server}/api/sessions/{sid}/undo", "POST")
    assert undone["points"] == [[24, 32, 30, 1]] and undone["result"]["mask_voxels"] == first["result"]["mask_voxels"]
    cleared = ok(f"{server}/api/sessions/{sid}/clear", "POST")
    assert cleared["points"] == [] and cleared["box"] is None and cleared["result"] == {}
    status, err = call(f"{server}/api/sessions/{sid}/mask")
    assert status == 404 and err["field"] == "mask"
    status, err = call(f"{server}/api/sessions/{sid}/undo", "POST")
    assert status == 400 and "nothing to undo" in err["error"]


def test_text_segmentation_vqa_and_report(server):
    sid = open_demo(server)["session"]
    semantic = ok(f"{server}/api/sessions/{sid}/segment", "POST", {"task": "semantic", "text": "left thalamus, brain stem"})
    assert [o["name"] for o in semantic["result"]["objects"]] == ["left thalamus", "brain stem"]
    referring = ok(f"{server}/api/sessions/{sid}/segment", "POST", {"task": "referring", "text": "Where is the lesion?"})
    assert referring["result"]["task"] == "referring_seg" and isinstance(referring["result"]["text"], str)
    answer = ok(f"{server}/api/sessions/{sid}/ask", "POST", {"question": "Which structure contains the lesion?"})
    assert answer["question"] == "Which structure contains the lesion?" and isinstance(answer["answer"], str)
    assert isinstance(ok(f"{server}/api/sessions/{sid}/report", "POST")["report"], str)


def test_uploaded_oblique_order_file_round_trips(server, model, tmp_path):
    """A file stored LPS-like with permuted axes: clicks are in its own indices, the mask on its grid."""
    image = nib.load(demo_file(model))
    data = np.transpose(np.asarray(image.dataobj), (2, 0, 1))[::-1]
    affine = image.affine[:, [2, 0, 1, 3]].copy()
    affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
    affine[:3, 0] *= -1
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    meta = ok(f"{server}/api/sessions/upload?filename=flipped.nii.gz", "POST", raw=path.read_bytes())
    assert meta["shape"] == list(data.shape) and meta["ras_axes"] == [1, 2, 0] and meta["ras_signs"] == [1, 1, -1]
    sid = meta["session"]
    ok(f"{server}/api/sessions/{sid}/points", "POST", {"point": [20, 24, 32], "label": 1})
    mask = nifti_of(ok(f"{server}/api/sessions/{sid}/mask.nii.gz"))
    assert mask.shape == data.shape and np.allclose(mask.affine, affine)
    ok(f"{server}/api/sessions/{sid}", "DELETE")
    assert call(f"{server}/api/sessions/{sid}")[0] == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("points", {"point": [24, 32, 99], "label": 1}, 400, "point"),
        ("points", {"point": [24, 32], "label": 1}, 400, "point"),
        ("points", {"point": [24, 32, 30], "label": 3}, 400, "label"),
        ("points", {"label": 1}, 422, "point"),
        ("points", {"point": ["a", 1, 2]}, 422, "point"),
        ("box", {"box": [1, 2, 3, 4, 5, 600]}, 400, "box"),
        ("segment", {"task": "panoptic"}, 400, "task"),
        ("segment", {"task": "referring", "text": "  "}, 400, "text"),
        ("segment", {"task": "interactive"}, 400, "prompts"),
        ("segment", {"task": "semantic", "text": "x", "threshold": 2}, 400, "threshold"),
        ("ask", {"question": ""}, 400, "question"),
    ],
)
def test_bad_requests_get_one_clear_error_naming_the_field(server, path, body, status, field):
    sid = open_demo(server)["session"]
    got, err = call(f"{server}/api/sessions/{sid}/{path}", "POST", body)
    assert (got, err["field"]) == (status, field), err
    assert err["error"].startswith(f"{field}: ")


def test_bad_volumes_and_sessions_are_refused(server, tmp_path):
    status, err = call(f"{server}/api/sessions/upload?filename=scan.png", "POST", raw=b"\x89PNG")
    assert (status, err["field"]) == (400, "filename")
    status, err = call(f"{server}/api/sessions/upload?filename=scan.nii.gz", "POST", raw=b"\x1f\x8b\x08truncated")
    assert (status, err["field"]) == (400, "file") and "scan.nii.gz" in err["error"]
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), flat)
    status, err = call(f"{server}/api/sessions/upload?filename=flat.nii.gz", "POST", raw=flat.read_bytes())
    assert (status, err["field"]) == (400, "file") and "constant" in err["error"]
    status, err = call(f"{server}/api/sessions", "POST", {"case": "../../etc/passwd"})
    assert (status, err["field"]) == (404, "case")
    status, err = call(f"{server}/api/sessions/nope/ask", "POST", {"question": "hi?"})
    assert (status, err["field"]) == (404, "session")


def test_concurrent_requests_are_queued_not_crashing(server):
    errors: list[str] = []
    results: list[int] = []

    def client(n: int) -> None:
        try:
            sid = open_demo(server, "ct/ct_000" if n % 2 else CASE)["session"]
            state = ok(f"{server}/api/sessions/{sid}/points", "POST", {"point": [20 + n, 30, 15], "label": 1})
            ok(f"{server}/api/sessions/{sid}/ask", "POST", {"question": f"Question {n}?"})
            results.append(state["result"]["mask_voxels"])
        except Exception as err:  # collected: an assertion in a thread would be lost
            errors.append(f"client {n}: {err!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors and len(results) == 6
    assert ok(f"{server}/api/info")["tasks"]["vqa"]  # still serving


# -- the page in a real browser -----------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in (CHROMIUM, CHROMEDRIVER):
        assert Path(tool).is_file(), f"{tool} is missing: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="medvlsam2-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1500,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


OVERLAY_PIXELS = """
const c = document.querySelector(arguments[0] + ' canvas');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) if (d[i] - d[i + 1] > 40 && d[i] - d[i + 2] > 40) n++;
return n;
"""


def test_click_in_the_browser_shows_the_mask_and_downloads_it(server, model, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app = lambda: browser.find_element(By.ID, "app")  # noqa: E731
    idle = lambda _: app().get_attribute("data-busy") == "0"  # noqa: E731
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    browser.get(server + "/")
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#demo-select option[value='{CASE}']"))
    Select(browser.find_element(By.ID, "demo-select")).select_by_value(CASE)
    browser.find_element(By.ID, "load-demo").click()
    wait.until(lambda b: app().get_attribute("data-session") and idle(b))
    assert browser.execute_script(OVERLAY_PIXELS, "#view-axial") == 0  # nothing drawn before a click
    assert browser.find_element(By.ID, "download").get_attribute("class").count("disabled")

    canvas = browser.find_element(By.CSS_SELECTOR, "#view-axial canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, -10, 10).click().perform()
    wait.until(lambda b: int(app().get_attribute("data-mask-voxels")) > 0 and idle(b))
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.execute_script(OVERLAY_PIXELS, "#view-axial") > 0
    assert browser.execute_script(OVERLAY_PIXELS, "#view-coronal") + browser.execute_script(OVERLAY_PIXELS, "#view-sagittal") > 0
    assert "+ (" in browser.find_element(By.ID, "prompt-list").text

    sid = app().get_attribute("data-session")
    state = ok(f"{server}/api/sessions/{sid}")
    assert len(state["points"]) == 1 and state["points"][0][3] == 1
    assert state["result"]["mask_voxels"] == int(app().get_attribute("data-mask-voxels"))
    href = browser.find_element(By.ID, "download").get_attribute("href")
    mask = nifti_of(ok(href))
    image = nib.load(demo_file(model))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)

    # A bad request shows its one-line error in the page, and the app keeps working.
    browser.find_element(By.ID, "referring-text").send_keys("   ")
    browser.find_element(By.CSS_SELECTOR, "#referring-form button").click()
    wait.until(lambda b: b.find_element(By.ID, "error").is_displayed() and idle(b))
    assert browser.find_element(By.ID, "error").text.startswith("text: ")
    browser.find_element(By.ID, "undo").click()
    wait.until(lambda b: int(app().get_attribute("data-mask-voxels")) == 0 and idle(b))
    assert browser.execute_script(OVERLAY_PIXELS, "#view-axial") == 0
    browser.save_screenshot(str(tmp_path / "serve.png"))


def test_a_taken_port_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run([sys.executable, "-m", "medvlsam2", "serve", "--model", str(tmp_path), "--port", str(port)],
                               capture_output=True, text=True, timeout=120)
    assert taken.returncode == 2 and taken.stderr.strip().count("\n") == 0 and "--port" in taken.stderr, taken.stderr
