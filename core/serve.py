"""``medvlsam2 serve``: the web app and its HTTP API over one exported model.

One ``ModelService`` loads the model once and serialises every forward pass with a lock, so
requests that arrive together queue instead of racing through the same modules. Each browser
tab (or API client) owns a session: its volume, its clicks and box, and its last mask. Points
and boxes are voxel indices of the file's own array, as in ``medvlsam2 predict``; masks go
back to the file's grid through the same ``restore`` path, so the web app, the API and the
command line agree voxel for voxel.

The front end (``core/static``) is plain HTML, CSS and JavaScript served from the package:
nothing is fetched from outside at run time.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlsam2.core.errors import InputError, MedVLError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
STATIC_DIR = Path(__file__).parent / "static"
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
#: Display windows (lower, upper) in Hounsfield units: level -/+ width / 2.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),
    "abdomen": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-700.0, 1300.0),
}
#: The kinds of task the app offers, by registry name; an export without one hides its controls.
APP_TASKS = ("interactive_seg", "semantic_seg", "referring_seg", "vqa", "report_generation")
SEG_KINDS = {"interactive": "interactive_seg", "semantic": "semantic_seg", "referring": "referring_seg"}
MAX_TEXT_CHARS = 2000


class RequestError(InputError):
    """A bad request: the HTTP status and the request field it is about travel with the message."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


@contextmanager
def about(field: str) -> Iterator[None]:
    """Re-raise an ``InputError`` from deeper code as a ``RequestError`` naming ``field``."""
    try:
        yield
    except RequestError:
        raise
    except MedVLError as err:
        message = str(err)
        for flag in ("--points: ", "--box: ", "--text: ", "points: ", "box: "):
            message = message.removeprefix(flag)
        raise RequestError(field, message) from err


@dataclass
class Session:
    """One loaded volume with its prompts and its latest mask (file grid)."""

    id: str
    name: str
    path: Path
    image: np.ndarray
    affine: np.ndarray
    owned_dir: Path | None = None
    points: list[tuple[int, int, int, int]] = field(default_factory=list)
    box: list[int] | None = None
    history: list[tuple[str, Any]] = field(default_factory=list)
    label_map: np.ndarray | None = None
    result: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    prepared: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: float = field(default_factory=time.monotonic)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def prompts(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "box": self.box}


def display_geometry(affine: np.ndarray) -> dict[str, Any]:
    """How the file's axes map to the patient's R, A, S axes, and the voxel spacing per file axis.

    The browser draws axial, coronal and sagittal views from this, so a file stored in any axis
    order or direction is shown the radiological way with the right aspect ratio.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    ras_axes, ras_signs = [0, 0, 0], [1, 1, 1]
    for file_axis, (ras_axis, sign) in enumerate(ornt):
        ras_axes[int(ras_axis)] = file_axis
        ras_signs[int(ras_axis)] = int(sign)
    spacing = [float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)]
    return {"ras_axes": ras_axes, "ras_signs": ras_signs, "spacing": spacing}


def intensity_info(image: np.ndarray) -> dict[str, Any]:
    """Range, automatic window and a CT guess (air near -1000 HU).

    The automatic window (MRI) spans the 1-99.5 percentiles of the voxels above the minimum, so
    a large empty background does not pull the window down and wash the anatomy out.
    """
    sample = image.reshape(-1)
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    vmin, vmax = float(image.min()), float(image.max())
    foreground = sample[sample > vmin]
    lo, hi = (float(v) for v in np.percentile(foreground if foreground.size else sample, [1.0, 99.5]))
    if hi <= lo:
        lo, hi = vmin, vmax
    is_ct = vmin <= -500.0 and vmax >= 0.0 and bool(np.all(np.mod(sample, 1) == 0))
    return {"min": vmin, "max": vmax, "auto_window": [lo, hi], "modality": "CT" if is_ct else "MR"}


class ModelService:
    """The model, loaded once and shared by every session; a lock serialises inference."""

    def __init__(self, model: str | Path, *, demo_data: str | Path | None = None, max_sessions: int = 16,
                 max_voxels: int = 64_000_000, max_upload_mb: int = 512) -> None:
        from medvlsam2.core.export import load_module

        self.model_path = Path(model)
        self.module, self.cfg, self.metadata = load_module(model)
        names = [str(entry["name"]) for entry in self.cfg.tasks]
        from medvlsam2.core.config import task_keys

        self.task_keys: dict[str, str] = {}
        for key, name in zip(task_keys(self.cfg.tasks), names):
            if name in APP_TASKS and name not in self.task_keys:
                self.task_keys[name] = key
        interactive = self.task_keys.get("interactive_seg")
        self.interactive_text = bool(interactive and getattr(self.module.tasks[interactive].cfg, "use_text", False))
        self.demo_cases = self._find_demo_cases(demo_data)
        self.max_sessions = max_sessions
        self.max_voxels = max_voxels
        self.max_upload_bytes = max_upload_mb * 1024 * 1024
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="medvlsam2-serve-"))

    # -- catalogue -------------------------------------------------------------------------------
    def _find_demo_cases(self, demo_data: str | Path | None) -> dict[str, Path]:
        """Demo volumes by id (``brain/brain_000``): from ``demo_data`` or the folders the model
        was trained on. Clients name a case by id, never by path, so no other file can be read."""
        import json

        roots: list[Path] = []
        if demo_data is not None:
            roots.append(Path(demo_data))
        else:
            for entry in self.cfg.tasks:
                root = (entry.get("data") or {}).get("root")
                if root:
                    roots += [Path(str(root)), Path(str(root)).parent]
        cases: dict[str, Path] = {}
        for root in roots:
            manifest = root / "demo.json"
            if not manifest.is_file():
                continue
            try:
                datasets = json.loads(manifest.read_text(encoding="utf-8")).get("datasets", {})
            except (OSError, ValueError):
                continue
            for key, info in sorted(datasets.items()):
                folder = root / str(info.get("root", key))
                for image in sorted(folder.glob("images*/*.nii*"), key=lambda p: p.name):
                    cases.setdefault(f"{key}/{image.name.split('.')[0]}", image)
        return cases

    def info(self) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "tasks": {name: name in self.task_keys for name in APP_TASKS},
            "interactive_text": self.interactive_text,
            "demo_cases": list(self.demo_cases),
            "ct_windows": {k: list(v) for k, v in CT_WINDOWS.items()},
            "upload_suffixes": list(UPLOAD_SUFFIXES),
            "max_upload_mb": self.max_upload_bytes // (1024 * 1024),
        }

    # -- sessions --------------------------------------------------------------------------------
    def open_demo(self, case: str) -> Session:
        path = self.demo_cases.get(case)
        if path is None:
            known = ", ".join(list(self.demo_cases)[:8]) or "none (start the server with --demo-data)"
            raise RequestError("case", f"unknown demo case '{case}'; cases: {known}", 404)
        return self._open(path, case, owned_dir=None)

    def open_upload(self, filename: str, data: bytes) -> Session:
        name = Path(filename or "").name
        if not name.lower().endswith(UPLOAD_SUFFIXES):
            raise RequestError("filename", f"'{filename}' is not a NIfTI or NRRD file ({', '.join(UPLOAD_SUFFIXES)})")
        if not data:
            raise RequestError("file", "the upload is empty")
        if len(data) > self.max_upload_bytes:
            raise RequestError("file", f"the upload is larger than {self.max_upload_bytes // 2**20} MB", 413)
        if name.lower().endswith(".gz") and not data.startswith(b"\x1f\x8b"):
            raise RequestError("file", f"'{name}' is not gzip-compressed (truncated or not a .nii.gz?)")
        folder = Path(tempfile.mkdtemp(dir=self._tmp))
        path = folder / name
        path.write_bytes(data)
        try:
            return self._open(path, name, owned_dir=folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _open(self, path: Path, name: str, owned_dir: Path | None) -> Session:
        from medvlsam2.plugins.tasks.data.transforms import read_volume

        with about("file"):
            volume = read_volume(path)
        image = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume)
        if image.size > self.max_voxels:
            raise RequestError("file", f"{name}: {image.size:,} voxels; this server accepts up to {self.max_voxels:,}", 413)
        if float(image.min()) == float(image.max()):
            raise RequestError("file", f"{name}: the volume is constant (every voxel = {float(image.min()):g}); nothing to show or segment")
        affine = np.asarray(volume.affine, dtype=np.float64)
        session = Session(id=uuid.uuid4().hex, name=name, path=path, image=image.astype(np.float32), affine=affine,
                          owned_dir=owned_dir)
        with self._sessions_lock:
            self.sessions[session.id] = session
            while len(self.sessions) > self.max_sessions:  # the least recently used goes
                _, old = self.sessions.popitem(last=False)
                self._discard(old)
        return session

    def session(self, sid: str) -> Session:
        with self._sessions_lock:
            session = self.sessions.get(sid)
            if session is None:
                raise RequestError("session", f"unknown session '{sid}' (expired or never opened); load a volume again", 404)
            self.sessions.move_to_end(sid)
            session.used = time.monotonic()
            return session

    def close(self, sid: str) -> None:
        with self._sessions_lock:
            session = self.sessions.pop(sid, None)
        if session is None:
            raise RequestError("session", f"unknown session '{sid}'", 404)
        self._discard(session)

    def _discard(self, session: Session) -> None:
        if session.owned_dir is not None:
            shutil.rmtree(session.owned_dir, ignore_errors=True)

    def shutdown(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def describe(self, session: Session) -> dict[str, Any]:
        """What a client needs to draw the volume: shape, geometry, intensities, prompts, mask."""
        return {
            "session": session.id,
            "name": session.name,
            "shape": list(session.shape),
            "affine": session.affine.tolist(),
            **display_geometry(session.affine),
            **intensity_info(session.image),
            "volume_dtype": self.volume_dtype(session),
            **session.prompts(),
            "result": session.result,
        }

    @staticmethod
    def volume_dtype(session: Session) -> str:
        """``int16`` when the intensities are whole numbers that fit (CT), halving the transfer."""
        image = session.image
        whole = float(image.min()) >= -32768 and float(image.max()) <= 32767 and bool(np.all(np.mod(image, 1) == 0))
        return "int16" if whole else "float32"

    def volume_bytes(self, session: Session) -> bytes:
        """The file's array in C order (index ``(i * ny + j) * nz + k``), little endian."""
        dtype = np.dtype(self.volume_dtype(session)).newbyteorder("<")
        return np.ascontiguousarray(session.image.astype(dtype)).tobytes()

    # -- prompts ---------------------------------------------------------------------------------
    def _check_voxel(self, session: Session, where: str, coords: list[int]) -> None:
        for axis, (c, n) in enumerate(zip(coords, session.shape)):
            if not 0 <= c < n:
                raise RequestError(where, f"index {c} on axis {'ijk'[axis]} lies outside the volume of shape {session.shape}")

    def add_point(self, sid: str, point: list[int], label: int) -> dict[str, Any]:
        session = self.session(sid)
        if len(point) != 3:
            raise RequestError("point", f"expected 3 voxel indices (i, j, k), got {len(point)}")
        if label not in (0, 1):
            raise RequestError("label", f"expected 1 (foreground) or 0 (background), got {label}")
        self._check_voxel(session, "point", point)
        with session.lock:
            session.points.append((int(point[0]), int(point[1]), int(point[2]), int(label)))
            session.history.append(("point", None))
            return self._rerun(session)

    def set_box(self, sid: str, box: list[int]) -> dict[str, Any]:
        session = self.session(sid)
        if len(box) != 6:
            raise RequestError("box", f"expected 6 voxel indices (i0, j0, k0, i1, j1, k1), got {len(box)}")
        lo, hi = [min(a, b) for a, b in zip(box[:3], box[3:])], [max(a, b) for a, b in zip(box[:3], box[3:])]
        self._check_voxel(session, "box", lo)
        self._check_voxel(session, "box", hi)
        with session.lock:
            session.history.append(("box", session.box))
            session.box = [*lo, *hi]
            return self._rerun(session)

    def undo(self, sid: str) -> dict[str, Any]:
        session = self.session(sid)
        with session.lock:
            if not session.history:
                raise RequestError("prompts", "nothing to undo")
            kind, previous = session.history.pop()
            if kind == "point":
                session.points.pop()
            else:
                session.box = previous
            return self._rerun(session)

    def clear(self, sid: str) -> dict[str, Any]:
        session = self.session(sid)
        with session.lock:
            session.points, session.box, session.history = [], None, []
            session.label_map, session.result = None, {}
            return self.state(session)

    def state(self, session: Session) -> dict[str, Any]:
        return {"session": session.id, **session.prompts(), "result": session.result}

    def _rerun(self, session: Session) -> dict[str, Any]:
        """After a prompt change: the interactive mask from every click and the box, or no mask."""
        if not session.points and session.box is None:
            session.label_map, session.result = None, {}
            return self.state(session)
        self._segment(session, "interactive_seg", None, session.threshold)
        return self.state(session)

    # -- inference -------------------------------------------------------------------------------
    def _task(self, name: str, field_name: str = "task") -> tuple[str, Any]:
        key = self.task_keys.get(name)
        if key is None:
            raise RequestError(field_name, f"this model has no {name} task; it offers: {', '.join(self.task_keys) or 'none'}")
        return key, self.module.tasks[key]

    def _prepared(self, session: Session, key: str, task: Any) -> tuple[Any, Any]:
        """The model input for ``task``'s preprocessing, cached per session."""
        from medvlsam2.core.predict import preprocess_config_of
        from medvlsam2.plugins.tasks.data.transforms import preprocess

        cfg = preprocess_config_of(key, task, self.metadata)
        tag = repr(cfg)
        if tag not in session.prepared:
            with about("file"):
                session.prepared[tag] = preprocess(session.path, cfg)
        return session.prepared[tag]

    def _infer(self, session: Session, name: str, text: str | None, points: Any = None, box: Any = None) -> tuple[dict[str, Any], Any]:
        import torch

        key, task = self._task(name)
        volume, record = self._prepared(session, key, task)
        with self._model_lock, torch.no_grad(), about("text" if text else "prompts"):
            try:
                result = task.infer(self.module.model, volume[None], text=text, points=points, box=box)
            except (MemoryError, torch.OutOfMemoryError) as err:
                raise RequestError("file", "out of memory running the model on this volume", 413) from err
        return result, record

    def _segment(self, session: Session, name: str, text: str | None, threshold: float) -> None:
        from medvlsam2.core.predict import describe_objects, label_map_of, mark_empty, prompts_to_model

        points = box = None
        if name == "interactive_seg":
            key, task = self._task(name)
            _, record = self._prepared(session, key, task)
            with about("prompts"):
                points, box = prompts_to_model(record, session.points or None, tuple(session.box) if session.box else None)
        started = time.perf_counter()
        result, record = self._infer(session, name, text, points, box)
        masks = result.get("masks")
        if masks is None:
            raise RequestError("task", f"{name} returned no mask")
        label_map = label_map_of(masks, record, threshold)
        session.label_map = label_map
        session.threshold = threshold
        objects = describe_objects(label_map, session.affine, list(result.get("names") or []),
                                   list(result.get("scores") or []), len(masks))
        mark_empty(objects, threshold)
        session.result = {
            "task": name,
            "text": result.get("text"),
            "threshold": threshold,
            "objects": objects,
            "mask_voxels": int((label_map > 0).sum()),
            "seconds": round(time.perf_counter() - started, 3),
            "version": uuid.uuid4().hex[:8],
        }

    def segment(self, sid: str, kind: str, text: str | None, threshold: float) -> dict[str, Any]:
        session = self.session(sid)
        name = SEG_KINDS.get(kind)
        if name is None:
            raise RequestError("task", f"'{kind}' is not one of {', '.join(SEG_KINDS)}")
        if not 0.0 < threshold < 1.0:
            raise RequestError("threshold", f"expected a probability between 0 and 1, got {threshold}")
        text = check_text_field(text, "text")
        if name == "referring_seg" and not text:
            raise RequestError("text", "a referring prompt needs the description or question")
        if name == "interactive_seg":
            if text and not self.interactive_text:
                raise RequestError("text", "this model's interactive task was trained without text; leave it out")
            if not session.points and session.box is None:
                raise RequestError("prompts", "add a point or draw a box first")
        with session.lock:
            self._segment(session, name, text, threshold)
            return self.state(session)

    def ask(self, sid: str, question: str) -> dict[str, Any]:
        session = self.session(sid)
        question = check_text_field(question, "question")
        if not question:
            raise RequestError("question", "empty question")
        with session.lock:
            result, _ = self._infer(session, "vqa", question)
        return {"question": question, "answer": result.get("text"), **({"choice": result["choice"]} if "choice" in result else {})}

    def report(self, sid: str) -> dict[str, Any]:
        session = self.session(sid)
        with session.lock:
            result, _ = self._infer(session, "report_generation", None)
        return {"report": result.get("text")}

    def mask_bytes(self, sid: str) -> bytes:
        """The label map on the file grid, uint8 in the volume's C order."""
        session = self.session(sid)
        if session.label_map is None:
            raise RequestError("mask", "no mask yet: add a point, draw a box or run a text prompt", 404)
        return np.ascontiguousarray(session.label_map, dtype=np.uint8).tobytes()

    def mask_nifti(self, sid: str) -> bytes:
        """The mask as ``.nii.gz`` with the input's shape and affine, as ``medvlsam2 predict`` writes it."""
        import nibabel as nib

        session = self.session(sid)
        if session.label_map is None:
            raise RequestError("mask", "no mask yet: add a point, draw a box or run a text prompt", 404)
        image = nib.Nifti1Image(session.label_map.astype(np.uint8), session.affine)
        return gzip.compress(image.to_bytes(), compresslevel=6)


def check_text_field(text: str | None, field_name: str) -> str | None:
    """Strip ``text``; blank means none; over-long text is refused."""
    if text is None:
        return None
    text = text.strip()
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(field_name, f"{len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text or None


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be served."""
    import socket

    if not 0 < port < 65536:
        raise InputError(f"--port: {port} is not a port number (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise InputError(f"--host: cannot resolve '{host}': {err}") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise InputError(f"--port: cannot listen on {host}:{port} ({err.strerror}); is another server running?") from err


def serve(model: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, demo_data: str | Path | None = None) -> None:
    """Load the model, then serve the app until interrupted."""
    try:
        import uvicorn

        from medvlsam2.core.serve_app import create_app
    except ImportError as err:
        raise InputError(f"serve: the web stack is not installed ({err.name}); pip install 'medvlsam2[serve]'") from err
    check_port(host, port)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    service = ModelService(model, demo_data=demo_data)
    app = create_app(service)
    print(f"MedVL-SAM2 app on http://{host}:{port}  (model {model}; {len(service.demo_cases)} demo cases)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.shutdown()
