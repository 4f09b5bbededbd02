"""The HTTP layer of ``medvlsam2 serve``: the page, its assets and the JSON / binary API.

Kept apart from ``core.serve`` so the session and model logic import without the web stack,
and so FastAPI sees the request models at module level. Every error is JSON
``{"error": "FIELD: message", "field": "FIELD"}`` with a 4xx status; only a bug gives a 500.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from medvlsam2.core.errors import MedVLError
from medvlsam2.core.serve import STATIC_DIR, ModelService, RequestError


class DemoBody(BaseModel):
    case: str = Field(description="a demo case id from /api/info, e.g. brain/brain_000")


class PointBody(BaseModel):
    point: list[int] = Field(description="voxel indices (i, j, k) of the file's array")
    label: int = Field(1, description="1 foreground, 0 background")


class BoxBody(BaseModel):
    box: list[int] = Field(description="inclusive voxel box (i0, j0, k0, i1, j1, k1)")


class SegmentBody(BaseModel):
    task: str = Field(description="interactive, semantic or referring")
    text: str | None = Field(None, description="class names (semantic) or the description (referring)")
    threshold: float = Field(0.5, description="probability above which a voxel is in the mask")


class AskBody(BaseModel):
    question: str


def create_app(service: ModelService) -> FastAPI:
    """The app over one shared ``ModelService``. Handlers are sync (run in a thread pool); the
    service's lock queues concurrent model calls."""
    app = FastAPI(title="MedVL-SAM2", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err), "field": err.field}, status_code=err.status)

    @app.exception_handler(MedVLError)
    async def _input_error(_: Request, err: MedVLError) -> JSONResponse:
        return JSONResponse({"error": str(err), "field": None}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        name = loc[0] if loc else "body"
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            message = "required"
        return JSONResponse({"error": f"{name}: {message}", "field": name}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}", "field": None}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.post("/api/sessions")
    def open_demo(body: DemoBody) -> dict[str, Any]:
        return service.describe(service.open_demo(body.case))

    @app.post("/api/sessions/upload")
    async def open_upload(request: Request, filename: str) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > service.max_upload_bytes:  # refuse before reading it
            raise RequestError("file", f"the upload is larger than {service.max_upload_bytes // 2**20} MB", 413)
        data = await request.body()
        session = await run_in_threadpool(service.open_upload, filename, data)
        return service.describe(session)

    @app.get("/api/sessions/{sid}")
    def describe(sid: str) -> dict[str, Any]:
        return service.describe(service.session(sid))

    @app.delete("/api/sessions/{sid}")
    def close(sid: str) -> dict[str, Any]:
        service.close(sid)
        return {"closed": sid}

    @app.get("/api/sessions/{sid}/volume")
    def volume(sid: str) -> Response:
        session = service.session(sid)
        headers = {"X-Volume-Shape": ",".join(map(str, session.shape)), "X-Volume-Dtype": service.volume_dtype(session)}
        return Response(service.volume_bytes(session), media_type="application/octet-stream", headers=headers)

    @app.post("/api/sessions/{sid}/points")
    def add_point(sid: str, body: PointBody) -> dict[str, Any]:
        return service.add_point(sid, body.point, body.label)

    @app.post("/api/sessions/{sid}/box")
    def set_box(sid: str, body: BoxBody) -> dict[str, Any]:
        return service.set_box(sid, body.box)

    @app.post("/api/sessions/{sid}/undo")
    def undo(sid: str) -> dict[str, Any]:
        return service.undo(sid)

    @app.post("/api/sessions/{sid}/clear")
    def clear(sid: str) -> dict[str, Any]:
        return service.clear(sid)

    @app.post("/api/sessions/{sid}/segment")
    def segment(sid: str, body: SegmentBody) -> dict[str, Any]:
        return service.segment(sid, body.task, body.text, body.threshold)

    @app.post("/api/sessions/{sid}/ask")
    def ask(sid: str, body: AskBody) -> dict[str, Any]:
        return service.ask(sid, body.question)

    @app.post("/api/sessions/{sid}/report")
    def report(sid: str) -> dict[str, Any]:
        return service.report(sid)

    @app.get("/api/sessions/{sid}/mask")
    def mask(sid: str) -> Response:
        return Response(service.mask_bytes(sid), media_type="application/octet-stream")

    @app.get("/api/sessions/{sid}/mask.nii.gz")
    def mask_nifti(sid: str) -> Response:
        stem = service.session(sid).name.split("/")[-1].split(".")[0].replace('"', "") or "volume"
        return Response(service.mask_nifti(sid), media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{stem}_mask.nii.gz"'})

    return app
