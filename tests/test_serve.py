"""The search service and its HTTP API over a tiny trained run.

Results are checked against an independent reference: the run's own embeddings computed in this
process and ranked by brute force (numpy), relevance read from ``qrels.jsonl``; the attention
against ``embed_docs(..., return_attention=True)``; the micro-batcher against what it was given.
Every bad input gets a 4xx with a message, never a traceback.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from _cli import TINY_MODEL, run_embeddings
from PIL import Image
from starlette.testclient import TestClient

from mixer_lite.dataset import ImageTable, image_files
from mixer_lite.server import MicroBatcher, create_app
from mixer_lite.service import Limits, SearchService, build_run_index
from mixer_lite.train import config_from, train

LIMITS = Limits(max_k=50, max_pixels=300 * 300, max_upload_bytes=200_000, max_photos=4)


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    train(tiny_dir[0], out, config_from("tiny-cpu", [*TINY_MODEL, "--steps=40",
                                                     "--eval_at_end=false"]), progress=False)
    return out


@pytest.fixture(scope="module")
def service(run, tiny_dir):
    return SearchService(run, tiny_dir[0], LIMITS, progress=False)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, window_s=0.001)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(run, tiny_dir):
    """Doc and query embeddings computed here, and qrels read from the file."""
    ref = run_embeddings(run, tiny_dir[0])
    qrels = {}
    for line in (tiny_dir[0] / "qrels.jsonl").read_text().splitlines():
        r = json.loads(line)
        qrels[r["query_id"]] = set(r["doc_ids"])
    return {**ref, "qrels": qrels}


def brute_force(reference, query_id: str, k: int):
    data = reference["data"]
    scores = reference["docs"] @ reference["queries"][data.query_row[query_id]]
    order = np.argsort(-scores, kind="stable")[:k]
    return [data.doc_ids[i] for i in order], scores[order]


def same_ranking(hits, ids, scores, tol=1e-4):
    """Scores equal within ``tol`` rank by rank; ids equal except among near-tied scores."""
    got = np.array([h["score"] for h in hits])
    np.testing.assert_allclose(got, scores, atol=tol)
    for i, h in enumerate(hits):
        if h["doc_id"] != ids[i]:
            tied = [j for j in range(len(ids)) if abs(scores[j] - scores[i]) <= tol]
            assert h["doc_id"] in [ids[j] for j in tied], (i, h, ids[i])


def photo_bytes(service, query_id: str) -> bytes:
    return open(service.query_files[service.query_row(query_id)], "rb").read()


def test_search_by_query_id_matches_a_brute_force_ranking(client, service, reference):
    for query_id in service.test_queries[:5]:
        r = client.post("/search", files={"query_id": (None, query_id), "k": (None, "20")})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["k"] == 20 and len(out["results"]) == 1
        hits = out["results"][0]["hits"]
        ids, scores = brute_force(reference, query_id, 20)
        same_ranking(hits, ids, scores)
        assert [h["rank"] for h in hits] == list(range(1, 21))
        for h in hits:
            assert h["relevant"] == (h["doc_id"] in reference["qrels"][query_id])
            assert h["title"] == reference["data"].doc_texts[reference["data"].doc_row[h["doc_id"]]]
            assert h["image_url"] == f"/docs/{h['doc_id']}/image"
        t = out["timings"]
        assert all(t[f"{p}_ms"] >= 0 for p in ("decode", "queue", "embed", "search"))
        assert t["total_ms"] >= t["decode_ms"] + t["embed_ms"] + t["search_ms"]


def test_an_upload_gets_the_same_hits_as_its_query_id_without_relevance(client, service):
    q = service.test_queries[0]
    by_id = client.post("/search", files={"query_id": (None, q), "k": (None, "10")}).json()
    up = client.post("/search", files={"image": ("photo.jpg", photo_bytes(service, q),
                                                 "image/jpeg"), "k": (None, "10")})
    assert up.status_code == 200, up.text
    res = up.json()["results"][0]
    assert res["photo"] == "upload photo.jpg" and res["query_id"] is None
    assert [h["doc_id"] for h in res["hits"]] == \
        [h["doc_id"] for h in by_id["results"][0]["hits"]]
    assert all(h["relevant"] is None for h in res["hits"])


def test_a_pack_of_the_folder_serves_the_same_hits_and_image_bytes(run, client, service,
                                                                   tiny_pack):
    """The service over the folder's pack (``mixer-lite pack``) uses the run's index (same
    fingerprint), ranks alike, and serves each image's bytes from the shards with its type."""
    packed = SearchService(run, tiny_pack, LIMITS, progress=False)
    with TestClient(create_app(packed, window_s=0.001)) as c:
        for q in service.test_queries[:3]:
            form = {"query_id": (None, q), "k": (None, "10")}
            a = client.post("/search", files=form).json()["results"][0]["hits"]
            b = c.post("/search", files=form).json()["results"][0]["hits"]
            assert [(h["doc_id"], h["score"], h["relevant"]) for h in b] == \
                [(h["doc_id"], h["score"], h["relevant"]) for h in a]
            doc = c.get(b[0]["image_url"])
            assert doc.status_code == 200 and doc.headers["content-type"] == "image/png"
            assert doc.content == client.get(a[0]["image_url"]).content
            photo = c.get(f"/queries/{q}/image")
            assert photo.content == photo_bytes(service, q)


def test_several_photos_in_one_request_each_get_their_own_results(client, service, reference):
    qs = service.test_queries[:3]
    files = [("query_id", (None, q)) for q in qs] + [("k", (None, "5"))]
    out = client.post("/search", files=files).json()
    assert [r["query_id"] for r in out["results"]] == qs
    assert out["timings"]["batch"] >= 3
    for q, r in zip(qs, out["results"]):
        ids, scores = brute_force(reference, q, 5)
        same_ranking(r["hits"], ids, scores)


def test_the_batcher_answers_each_request_from_one_shared_call():
    calls = []

    def run(photos, k):
        calls.append((len(photos), k))
        rows = np.repeat(photos[:, :1], 8, axis=1)  # each photo's rows: its own value
        return {"scores": rows.astype(np.float32), "rows": rows, "embed_s": 0.0,
                "search_s": 0.0}

    async def main():
        batcher = MicroBatcher(run, window_s=0.05, max_photos=64)
        batcher.start()
        parts = [np.full((n, 1), i, dtype=np.int64) for i, n in enumerate((1, 2, 1, 3))]
        outs = await asyncio.gather(*(batcher.submit(p, k) for p, k in zip(parts, (2, 5, 3, 1))))
        await batcher.stop()
        return parts, outs

    parts, outs = asyncio.run(main())
    assert calls == [(7, 5)]  # one call, the largest k
    for i, (p, k, out) in enumerate(zip(parts, (2, 5, 3, 1), outs)):
        assert out["rows"].shape == (len(p), k) and (out["rows"] == i).all()
        assert out["batch"] == 7 and out["queue_s"] >= 0


def test_the_batcher_passes_an_error_to_every_waiting_request_and_goes_on():
    def run(photos, k):
        if (photos == 0).any():
            raise RuntimeError("model failed")
        return {"scores": np.zeros((len(photos), k)), "rows": np.zeros((len(photos), k), int),
                "embed_s": 0.0, "search_s": 0.0}

    async def main():
        batcher = MicroBatcher(run, window_s=0.05)
        batcher.start()
        failed = await asyncio.gather(batcher.submit(np.zeros((1, 1)), 1),
                                      batcher.submit(np.ones((1, 1)), 1), return_exceptions=True)
        after = await batcher.submit(np.ones((2, 1)), 3)
        await batcher.stop()
        return failed, after

    failed, after = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in failed)
    assert after["rows"].shape == (2, 3)


def test_a_doc_attention_is_the_models_attention(client, service, reference):
    data, model = reference["data"], service.model
    doc_id = data.doc_ids[3]
    out = client.get(f"/docs/{doc_id}/attention").json()
    image = ImageTable([image_files(data, "docs")[3]], model.cfg.image_size)[[0]]
    tokens = model.tokenize([data.doc_texts[3]])
    with torch.no_grad():
        _, info = model.embed_docs(image, tokens, return_attention=True)
    assert out["title"] == data.doc_texts[3] and out["grid"] == info["grid"]
    assert len(out["concepts"]) == model.cfg.n_concepts
    ids = tokens["input_ids"][0][tokens["attention_mask"][0]]
    words = model.tokenizer.convert_ids_to_tokens(ids)
    for c in out["concepts"]:
        want = info["text_to_image"][0, c["concept"]].numpy()
        np.testing.assert_allclose(c["map"], want, atol=1e-4)
        assert abs(sum(c["map"]) - 1) < 1e-3
        read = info["token_to_concept"][0, c["concept"], : len(words)].numpy()
        assert c["words"][0][0] == words[int(np.argmax(read))]
    assert 0 <= out["image_weight"] <= 1
    img = client.get(f"/docs/{doc_id}/image")
    assert img.status_code == 200
    assert img.content == open(image_files(data, "docs")[3], "rb").read()


def test_pages_and_listings(client, service):
    page = client.get("/")
    assert page.status_code == 200 and "mixer-lite search" in page.text
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["docs"] == len(service.data.docs)
    listing = client.get("/queries?limit=5&offset=2").json()
    assert listing["total"] == len(service.test_queries)
    assert [q["query_id"] for q in listing["queries"]] == service.test_queries[2:7]
    q = listing["queries"][0]
    assert set(q["relevant"]) == service.relevant[q["query_id"]]
    assert client.get(q["image_url"]).content == photo_bytes(service, q["query_id"])


def png(width, height) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


BAD_SEARCHES = {
    "not an image": ({"image": ("notes.txt", b"hello, not a photo", "text/plain")}, 400,
                     "upload notes.txt: not an image"),
    "truncated PNG": ({"image": ("cut.png", png(64, 64)[:60], "image/png")}, 400,
                      "upload cut.png: not an image"),
    "over the pixel limit": ({"image": ("big.png", png(400, 400), "image/png")}, 413,
                             "400 x 400 pixels, over the limit of 90,000"),
    "over the upload limit": ({"image": ("huge.bin", b"\0" * 300_000, "image/png")}, 413,
                              "over the limit of 200,000"),
    "k zero": ({"query_id": (None, "Q"), "k": (None, "0")}, 400, "k must be between 1 and 50"),
    "k too large": ({"query_id": (None, "Q"), "k": (None, "51")}, 400, "between 1 and 50"),
    "k not a number": ({"query_id": (None, "Q"), "k": (None, "ten")}, 400, "whole number"),
    "no photo": ({"k": (None, "5")}, 400, "no photo"),
    "unknown query": ({"query_id": (None, "no-such-query")}, 404, "no query 'no-such-query'"),
    "too many photos": ([("query_id", (None, "Q"))] * 5, 413, "5 photos in one request"),
}


@pytest.mark.parametrize("case", BAD_SEARCHES)
def test_a_bad_search_gets_a_4xx_with_its_reason(client, service, case):
    files, status, message = BAD_SEARCHES[case]
    q = service.test_queries[0]
    if isinstance(files, dict):
        files = {k: (None, q) if v == (None, "Q") else v for k, v in files.items()}
    else:
        files = [(k, (None, q)) for k, _ in files]
    r = client.post("/search", files=files)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text


def test_a_search_that_is_not_a_form_or_not_a_post_is_refused(client):
    r = client.post("/search", json={"query_id": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
    assert client.get("/search").status_code == 405


@pytest.mark.parametrize("path", [
    "/docs/no-such-doc/image", "/docs/no-such-doc/attention", "/queries/no-such/image",
    "/docs/..%2F..%2Fdocs.jsonl/image", "/docs/../docs.jsonl/image",
    "/docs/%2e%2e/attention", "/queries/..%2Fqrels.jsonl/image", "/static/search.html",
    "/docs.jsonl", "/../../etc/passwd", "/queries?limit=zero"])
def test_unknown_ids_and_path_tricks_get_a_4xx_and_no_file(client, path, tiny_dir):
    r = client.get(path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    assert r.headers["content-type"].startswith("application/json") or r.status_code == 404
    assert b"doc_id" not in r.content and b"root:" not in r.content  # no JSONL, no passwd


def test_metrics_count_requests_by_route_and_status(service):
    with TestClient(create_app(service)) as c:
        q = service.test_queries[0]
        for _ in range(3):
            assert c.post("/search", files={"query_id": (None, q)}).status_code == 200
        c.post("/search", files={"query_id": (None, q), "k": (None, "0")})
        c.get("/docs/nope/image")
        text = c.get("/metrics").text
    counts = dict(re.findall(r'mixer_requests_total\{(route="[^"]+",status="\d+")\} (\d+)', text))
    assert counts == {'route="/search",status="200"': "3", 'route="/search",status="400"': "1",
                      'route="/docs/{doc_id}/image",status="404"': "1"}
    buckets = re.findall(r'mixer_search_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', text)
    assert buckets[-1] == ("+Inf", "3")
    assert [int(n) for _, n in buckets] == sorted(int(n) for _, n in buckets)  # cumulative
    assert "mixer_search_photos_total 3" in text
    phases = dict(re.findall(r'phase="(\w+)"\} ([\d.]+)', text))
    assert set(phases) == {"decode", "queue", "embed", "search"}
    assert float(phases["embed"]) > 0
    batches = {int(n): int(c) for n, c in
               re.findall(r'mixer_model_batches_total\{photos="(\d+)"\} (\d+)', text)}
    assert sum(n * c for n, c in batches.items()) == 3  # three one-photo searches


def test_serving_an_index_of_other_data_or_another_model_is_refused(run, tiny_dir, mini_dir,
                                                                   tmp_path):
    with pytest.raises(ValueError, match="whose docs differ from .*mini/docs.jsonl"):
        SearchService(run, mini_dir[0], progress=False)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("query_transform"))
    state["state_dict"][key] = state["state_dict"][key] * 0.5  # trained again, say
    torch.save(state, copy / "model.pt")
    with pytest.raises(ValueError, match="built from another .*model.pt"):
        SearchService(copy, tiny_dir[0], progress=False)
    # Rebuilt for the new model, the copy serves again.
    build_run_index(copy, tiny_dir[0], progress=False)
    assert SearchService(copy, tiny_dir[0], progress=False).index.ntotal > 0


def test_a_chunked_upload_over_the_limit_is_cut_while_it_arrives(client, service):
    def chunks():  # no Content-Length: the server learns the size only by reading
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    r = client.post("/search", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "over the limit of 200,000 bytes" in r.json()["error"]


# ------------------------------------------------------------------------------------------------
# The real server (`mixer-lite serve`, uvicorn) and its page in headless Chromium
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(service, run, tiny_dir):
    """``mixer-lite serve`` in a subprocess, as a user starts it; its URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixer_lite.cli", "serve", "--run", str(run),
                             "--data", str(tiny_dir[0]), "--port", str(port), "--threads=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"mixer-lite serve exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.send_signal(2)  # Ctrl-C: uvicorn shuts down cleanly
    assert proc.wait(timeout=30) in (0, 130), proc.stdout.read()


def test_the_served_api_answers_like_the_service(live, service):
    import urllib.request

    health = json.loads(urllib.request.urlopen(live + "/healthz").read())
    assert health["docs"] == service.index.ntotal
    q = service.test_queries[0]
    body, boundary = multipart({"query_id": q, "k": "7"}), "b0undary"
    req = urllib.request.Request(live + "/search", data=body, method="POST", headers={
        "content-type": f"multipart/form-data; boundary={boundary}"})
    out = json.loads(urllib.request.urlopen(req).read())
    assert [h["doc_id"] for h in out["results"][0]["hits"]] == \
        [h["doc_id"] for h in top(service, q, 7)]


def multipart(fields: dict, boundary: str = "b0undary") -> bytes:
    return b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                    .encode() for k, v in fields.items()) + f"--{boundary}--\r\n".encode()


def chromium():
    """Headless Chromium through its driver (Debian's chromium and chromium-driver; `make test`
    installs them where missing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert shutil.which(path), f"{path} missing: `make browser` installs Debian's chromium " \
                                   f"and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def top(service, query_id: str, k: int) -> list[dict]:
    """The service's hits for a dataset query, called in-process."""
    out = service.search_batch(service.query_photo(query_id)[None], k)
    return service.hits(out["scores"][0], out["rows"][0], query_id)


def test_the_search_page_in_a_real_browser(live, service, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    k = 50
    # A test photo among the first the page shows whose relevant doc is in the top k.
    found = [q for q in service.test_queries[:24] if any(h["relevant"] for h in top(service, q, k))]
    assert found, "no test photo of the first page has a relevant doc in the top k"
    query_id = found[0]
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(live + "/")
        wait.until(lambda d: "docs of" in d.find_element(By.ID, "info").text)
        photo = wait.until(seen.element_to_be_clickable(
            (By.CSS_SELECTOR, f'#photos img[data-query-id="{query_id}"]')))
        box = driver.find_element(By.ID, "k")
        box.clear()
        box.send_keys(str(k))
        photo.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == k)
        relevant = driver.find_elements(By.CSS_SELECTOR, "#results .hit.relevant")
        want = {h["doc_id"] for h in top(service, query_id, k) if h["relevant"]}
        assert {e.get_attribute("data-doc-id") for e in relevant} == want
        assert "first relevant doc at rank" in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "error").text == ""
        # Every result image loaded (a broken URL completes with naturalWidth 0); the images
        # load after the results are drawn, so first wait until each is complete.
        images = "return [...document.querySelectorAll('#results .hit img')]"
        wait.until(lambda d: d.execute_script(images + ".every(i => i.complete)"))
        assert driver.execute_script(images + ".every(i => i.naturalWidth > 0)")

        relevant[0].click()  # its attention view
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.concept canvas"))
                   == service.model.cfg.n_concepts)
        doc_id = relevant[0].get_attribute("data-doc-id")
        assert doc_id in driver.find_element(By.ID, "att-title").text
        att = service.doc_attention(doc_id)
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "figcaption.words")]
        assert [c.split(": ")[0] for c in captions] == \
            [f"concept {c['concept']}" for c in att["concepts"]]
        assert all(c["words"][0][0] in cap for c, cap in zip(att["concepts"], captions))
        # The maps are drawn: each canvas holds more than one colour.
        colours = driver.execute_script(
            "return [...document.querySelectorAll('figure.concept canvas')].map(c => {"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " const s = new Set(); for (let i = 0; i < d.length; i += 4 * 97)"
            " s.add(d[i] + ',' + d[i+1] + ',' + d[i+2]); return s.size; })")
        assert all(n > 10 for n in colours), colours
        driver.save_screenshot(str(tmp_path / "attention.png"))

        # An upload: results without relevance marks.
        photo_file = tmp_path / "photo.jpg"
        photo_file.write_bytes(photo_bytes(service, query_id))
        driver.find_element(By.ID, "upload").send_keys(str(photo_file))
        wait.until(lambda d: "an upload: relevance unknown" in d.find_element(By.ID, "status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .hit")) == k
        assert not driver.find_elements(By.CSS_SELECTOR, "#results .hit.relevant")
        # A bad upload: the server's message on the page.
        bad = tmp_path / "notes.txt"
        bad.write_text("not a photo")
        driver.find_element(By.ID, "upload").send_keys(str(bad))
        wait.until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
        driver.save_screenshot(str(tmp_path / "search.png"))
    finally:
        driver.quit()
    assert (tmp_path / "attention.png").stat().st_size > 10_000
