"""``mixer-lite serve``: a :class:`~mixer_lite.service.SearchService` behind HTTP, and its page.

Routes (JSON unless said):

* ``POST /search``: multipart form, photos as ``image`` files and/or dataset queries as
  ``query_id`` fields, and ``k``; per photo, the top-k docs (id, title, score, image and
  attention URLs, whether relevant when the photo is a judged query) and the time it spent in
  decode, queue, embed and search.
* ``GET /docs/{id}/image``, ``GET /queries/{id}/image``: the dataset's image files (by id: a
  path never comes from the URL).  ``GET /docs/{id}/attention``: the doc's concept maps.
* ``GET /queries``: the judged test queries the page offers.  ``GET /healthz``, ``GET /metrics``
  (Prometheus text: requests by route and status, latency histogram, time per phase).
* ``GET /``: the search page (``static/search.html``), the reviewers' attention viewer.

Concurrent searches are micro-batched (:class:`MicroBatcher`): the model runs on one worker
thread, and the photos of the requests that arrived while it was busy, or within a short
window after the first, go through the query tower together.  Built on Starlette (routing,
multipart parsing, body limits; the framework FastAPI is built on, without the request-model
layer this API does not need) and uvicorn.
"""
from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse,
                                 Response)
from starlette.routing import Route

from .dataset import PackedImage
from .service import Limits, Rejected, SearchService

LATENCY_BUCKETS_MS = (2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
PHASES = ("decode", "queue", "embed", "search")


class MicroBatcher:
    """Requests' photos gathered into one model call on one worker thread.

    The loop takes the first waiting request, every other request already waiting, then waits
    up to ``window_s`` for more while under ``max_photos``; one call of ``run(photos, k)`` (k the
    largest asked) answers them all.  ``window_s=0`` batches only what queued while the model
    was busy: no added wait at low load.
    """

    def __init__(self, run, window_s: float = 0.002, max_photos: int = 64, on_batch=None):
        self.run, self.window_s, self.max_photos = run, window_s, max_photos
        self.on_batch = on_batch  # called with each batch's photo count, on the event loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.worker.shutdown(wait=True)

    async def submit(self, photos: np.ndarray, k: int) -> dict:
        """The result of ``run`` for these photos (each row its own), with ``queue_s``."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((photos, k, future, time.perf_counter()))
        return await future

    async def in_worker(self, fn, *args):
        """``fn(*args)`` on the model's thread, between batches (the model is not re-entrant)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _gather(self) -> list:
        batch = [await self.queue.get()]
        n = len(batch[0][0])
        deadline = time.perf_counter() + self.window_s
        while n < self.max_photos:
            if self.queue.empty():
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), wait)
                except asyncio.TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            batch.append(item)
            n += len(item[0])
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            started = time.perf_counter()
            photos = np.concatenate([b[0] for b in batch])
            try:
                out = await self.in_worker(self.run, photos, max(b[1] for b in batch))
            except Exception as e:  # every waiting request gets the error, the loop goes on
                for *_, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            if self.on_batch:
                self.on_batch(len(photos))
            lo = 0
            for part, k, future, queued in batch:
                hi = lo + len(part)
                if not future.done():  # a client that went away has a cancelled future
                    future.set_result({**out, "scores": out["scores"][lo:hi, :k],
                                       "rows": out["rows"][lo:hi, :k], "batch": len(photos),
                                       "queue_s": started - queued})
                lo = hi


class Metrics:
    """Counters and a latency histogram in Prometheus' text format (no per-request storage:
    memory stays flat however long the server runs)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_s = 0.0
        self.phase_s = dict.fromkeys(PHASES, 0.0)
        self.photos = 0
        self.batches: dict[int, int] = {}

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def count_batch(self, photos: int) -> None:
        self.batches[photos] = self.batches.get(photos, 0) + 1

    def observe_search(self, seconds: float, phases: dict, photos: int) -> None:
        ms = seconds * 1000
        self.buckets[next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b),
                          len(LATENCY_BUCKETS_MS))] += 1
        self.latency_sum_s += seconds
        self.photos += photos
        for name in PHASES:
            self.phase_s[name] += phases[name]

    def text(self) -> str:
        lines = ["# TYPE mixer_requests_total counter"]
        lines += [f'mixer_requests_total{{route="{r}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())]
        lines.append("# TYPE mixer_search_latency_seconds histogram")
        total = 0
        for b, n in zip([*LATENCY_BUCKETS_MS, None], self.buckets):
            total += n
            le = "+Inf" if b is None else f"{b / 1000:g}"
            lines.append(f'mixer_search_latency_seconds_bucket{{le="{le}"}} {total}')
        lines += [f"mixer_search_latency_seconds_sum {self.latency_sum_s:.6f}",
                  f"mixer_search_latency_seconds_count {total}",
                  "# TYPE mixer_search_phase_seconds_total counter"]
        lines += [f'mixer_search_phase_seconds_total{{phase="{p}"}} {s:.6f}'
                  for p, s in self.phase_s.items()]
        lines += ["# TYPE mixer_search_photos_total counter", f"mixer_search_photos_total "
                  f"{self.photos}", "# TYPE mixer_model_batches_total counter"]
        lines += [f'mixer_model_batches_total{{photos="{n}"}} {c}'
                  for n, c in sorted(self.batches.items())]
        return "\n".join(lines) + "\n"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(service: SearchService, window_s: float = 0.002, max_batch: int = 64):
    """The ASGI app over ``service``: Starlette's routes, counted (the batcher starts and stops
    with the app)."""
    limits = service.limits
    metrics = Metrics()  # read and written on the event loop only
    batcher = MicroBatcher(service.search_batch, window_s, max_batch, metrics.count_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    async def read_form(request: Request):
        """The search form, its size checked from the header before any byte is read, and
        while it is read (a chunked upload names no size)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_upload_bytes:
            raise Rejected(413, f"the upload is {int(length):,} bytes, over the limit of "
                                f"{limits.max_upload_bytes:,}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Rejected(400, "send the photos as multipart/form-data: image files and/or "
                                "query_id fields, and k")
        capped = Request(request.scope, capped_receive(request.receive,
                                                       limits.max_upload_bytes))
        try:
            return await capped.form(max_files=limits.max_photos + 1,
                                     max_fields=limits.max_photos + 4)
        except HTTPException as e:  # the multipart parser's own limits
            raise Rejected(e.status_code, str(e.detail)) from None

    async def search_route(request: Request):
        t0 = time.perf_counter()
        form = await read_form(request)
        k = service.check_k(form.get("k", "10"))
        uploads = [f for f in form.getlist("image") if hasattr(f, "read")]
        query_ids = [str(q) for q in form.getlist("query_id")]
        if not uploads and not query_ids:
            raise Rejected(400, "no photo: send image files or query_id fields")
        if len(uploads) + len(query_ids) > limits.max_photos:
            raise Rejected(413, f"{len(uploads) + len(query_ids)} photos in one request, over "
                                f"the limit of {limits.max_photos}")
        named = [(f"upload {f.filename or i}", None, await f.read())
                 for i, f in enumerate(uploads)]
        named += [(f"query {q}", q, None) for q in query_ids]

        def decode_all():
            return np.stack([service.decode(raw, name) if raw is not None
                             else service.query_photo(q) for name, q, raw in named])

        t1 = time.perf_counter()
        photos = await run_in_threadpool(decode_all)
        t2 = time.perf_counter()
        out = await batcher.submit(photos, k)
        done = time.perf_counter()
        phases = {"decode": t2 - t1, "queue": out["queue_s"], "embed": out["embed_s"],
                  "search": out["search_s"]}
        metrics.observe_search(done - t0, phases, len(photos))
        timings = {f"{p}_ms": round(s * 1000, 3) for p, s in phases.items()}
        timings.update(total_ms=round((done - t0) * 1000, 3), batch=out["batch"])
        results = [{"photo": name, "query_id": q,
                    "hits": service.hits(out["scores"][i], out["rows"][i], q)}
                   for i, (name, q, _) in enumerate(named)]
        for r in results:
            for h in r["hits"]:
                h["image_url"] = f"/docs/{h['doc_id']}/image"
                h["attention_url"] = f"/docs/{h['doc_id']}/attention"
        return JSONResponse({"k": k, "results": results, "timings": timings})

    async def doc_image(request: Request):
        return image_file(service.doc_files[service.doc_row(request.path_params["doc_id"])])

    async def query_image(request: Request):
        return image_file(service.query_files[service.query_row(request.path_params["query_id"])])

    def image_file(file):
        """A folder's image file, or a pack's image bytes (its type from its file name)."""
        headers = {"Cache-Control": "max-age=3600"}
        if isinstance(file, PackedImage):
            kind = mimetypes.guess_type(file.path)[0] or "application/octet-stream"
            return Response(file.data, media_type=kind, headers=headers)
        return FileResponse(file, headers=headers)

    async def doc_attention(request: Request):
        doc_id = request.path_params["doc_id"]
        service.doc_row(doc_id)  # 404 before any work
        out = await batcher.in_worker(service.doc_attention, doc_id)
        out["image_url"] = f"/docs/{doc_id}/image"
        return JSONResponse(out)

    async def queries(request: Request):
        try:
            limit = int(request.query_params.get("limit", "60"))
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            raise Rejected(400, "limit and offset must be whole numbers") from None
        if limit < 1 or offset < 0:
            raise Rejected(400, "limit must be at least 1 and offset at least 0")
        shown = service.test_queries[offset: offset + min(limit, 500)]
        return JSONResponse({"total": len(service.test_queries), "offset": offset,
                             "queries": [{"query_id": q, "image_url": f"/queries/{q}/image",
                                          "relevant": sorted(service.relevant[q])}
                                         for q in shown]})

    async def healthz(request: Request):
        return JSONResponse({"status": "ok", **service.info()})

    async def metrics_route(request: Request):
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    page = resources.files("mixer_lite").joinpath("static/search.html").read_text()

    async def index_page(request: Request):
        return HTMLResponse(page)

    routes = [Route("/", index_page), Route("/healthz", healthz),
              Route("/metrics", metrics_route),
              Route("/search", search_route, methods=["POST"]),
              Route("/queries", queries), Route("/queries/{query_id}/image", query_image),
              Route("/docs/{doc_id}/image", doc_image),
              Route("/docs/{doc_id}/attention", doc_attention)]

    async def rejected(request: Request, e: Rejected):
        return error(e.status, str(e))

    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    async def server_error(request: Request, e: Exception):
        # The message names what failed (an unreadable doc image, say), never a traceback.
        return error(500, f"{type(e).__name__}: {e}")

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={Rejected: rejected, HTTPException: http_error,
                                        Exception: server_error})
    return CountRequests(app, metrics)


def capped_receive(receive, limit: int):
    """An ASGI ``receive`` that refuses a request body over ``limit`` bytes as it arrives."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise Rejected(413, f"the upload is over the limit of {limit:,} bytes")
        return message

    return wrapped


class CountRequests:
    """ASGI middleware: each response counted by its route's template and status (so
    ``/docs/{doc_id}/image`` is one series however many docs are asked for)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                self.metrics.count(getattr(route, "path", "other"), message["status"])
            await send(message)

        await self.app(scope, receive, send_counted)


def serve(run: str, data: str, host: str = "127.0.0.1", port: int = 8000,
          window_ms: float = 2.0, max_batch: int = 64, threads: int = 0, limits=None,
          access_log: bool = False, device: str = "cpu") -> None:
    """Load the run and its index once, then serve until interrupted."""
    import uvicorn

    service = SearchService(run, data, limits or Limits(), threads=threads, device=device)
    app = create_app(service, window_ms / 1000, max_batch)
    print(f"[serve] {service.info()['docs']} docs of {data}; http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log)
