"""The image downloader against a loopback HTTP server: a per-file deadline that a server dripping
bytes cannot outlast, failures recorded as they happen, and what an interrupted run leaves."""

import csv
import http.server
import io
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from ofaconv.clip import download
from ofaconv.clip.download import download_images

DRIP_SECONDS = 20.0


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/drip.png":
            # announces a large body, then sends one byte every 50 ms: no socket operation ever times out
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            end = time.monotonic() + DRIP_SECONDS
            try:
                while time.monotonic() < end:
                    self.wfile.write(b"\0")
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if not self.path.startswith("/ok"):
            self.send_response(404)
            self.end_headers()
            return
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())


@pytest.fixture
def base_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _csv(path, base_url, names):
    path.write_text("text,url,filename\n" + "".join(f"t{i},{base_url}/{n},{i}_{n}\n" for i, n in enumerate(names)))
    return path


def _filenames(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [row["filename"] for row in csv.DictReader(f)]


def test_deadline_bounds_a_download_over_all_its_attempts(tmp_path, base_url):
    src = _csv(tmp_path / "urls.csv", base_url, ["drip.png", "ok.png"])
    start = time.monotonic()
    r = download_images(src, tmp_path / "img", workers=2, timeout=5, deadline=1.0, retries=3, backoff=0.01)
    elapsed = time.monotonic() - start
    # without a total deadline: 4 attempts of ~5 s of drip each (or DRIP_SECONDS), never a socket timeout
    assert elapsed < 3.0
    assert (r["downloaded"], r["failed"]) == (1, 1)
    (failure,) = [json.loads(line) for line in Path(r["failures"]).read_text().splitlines()]
    assert failure["filename"] == "0_drip.png" and "deadline" in failure["error"]
    assert not list((tmp_path / "img").rglob("*drip*"))


def test_failures_are_recorded_while_the_run_goes_on(tmp_path, base_url):
    src = _csv(tmp_path / "urls.csv", base_url, ["missing.png", "drip.png"])
    manifest = tmp_path / "failures.jsonl"
    run = threading.Thread(target=download_images, args=(src, tmp_path / "img"),
                           kwargs={"workers": 2, "timeout": 5, "deadline": 3.0, "retries": 0, "failures": manifest})
    run.start()
    try:
        # the drip row holds the run for its 3 s deadline; the 404 must be on disk long before that
        seen, give_up = [], time.monotonic() + 1.5
        while not seen and time.monotonic() < give_up:
            seen = manifest.read_text().splitlines() if manifest.is_file() else []
            time.sleep(0.05)
        assert run.is_alive()
        assert [json.loads(line)["filename"] for line in seen] == ["0_missing.png"]
    finally:
        run.join()
    assert [json.loads(line)["filename"] for line in manifest.read_text().splitlines()] == ["0_missing.png",
                                                                                             "1_drip.png"]


def test_an_interrupted_run_leaves_its_manifest_and_csv(tmp_path, base_url, monkeypatch):
    real = download._fetch

    def fetch(url, *args):
        if url.endswith("/stop.png"):
            raise KeyboardInterrupt  # what Ctrl-C is to the main thread, raised where the work happens
        return real(url, *args)

    monkeypatch.setattr(download, "_fetch", fetch)
    names = ["ok.png", "missing.png", "ok.png", "stop.png", "ok.png", "ok.png", "ok.png"]
    src = _csv(tmp_path / "urls.csv", base_url, names)
    out_csv, manifest = tmp_path / "ok.csv", tmp_path / "failures.jsonl"
    with pytest.raises(KeyboardInterrupt):
        download_images(src, tmp_path / "img", workers=1, timeout=5, retries=0, failures=manifest, out_csv=out_csv)
    assert [json.loads(line)["filename"] for line in manifest.read_text().splitlines()] == ["1_missing.png"]
    assert _filenames(out_csv) == ["0_ok.png", "2_ok.png"]
    assert not list(tmp_path.rglob("*.part"))
    # resume: what is on disk is kept (the worker may have started row 4 before the interruption
    # reached the pool; it is finished, not recorded), the rest is fetched, and the CSV is complete
    monkeypatch.setattr(download, "_fetch", real)
    r = download_images(src, tmp_path / "img", workers=2, timeout=5, retries=0, failures=manifest, out_csv=out_csv)
    assert r["skipped_existing"] in (2, 3) and r["skipped_existing"] + r["downloaded"] == 5 and r["failed"] == 2
    assert _filenames(out_csv) == [f"{i}_ok.png" for i in (0, 2, 4, 5, 6)]


def test_only_http_urls_are_fetched_and_failures_exit_2(tmp_path, base_url, capsys):
    from ofaconv.cli import main

    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), "red").save(secret)
    src = tmp_path / "urls.csv"
    src.write_text("text,url,filename\n"
                   f"a,{base_url}/ok.png,a.png\n"
                   f"b,{secret.as_uri()},b.png\n"
                   "c,ftp://127.0.0.1/x.png,c.png\n"
                   "d,\"data:image/png;base64,iVBORw0KGgo=\",d.png\n")
    img = tmp_path / "img"
    assert main(["clip", "download", str(src), str(img), "--workers", "2", "--retries", "0"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["failed"] == 3
    assert captured.err.splitlines() == [
        f"ofaconv: error: 3 of 4 images failed (first: {src}:3: {secret.as_uri()}: not an http(s) URL; only http:// "
        f"and https:// are fetched); every failure is listed in {img / 'download_failures.jsonl'}"]
    failures = [json.loads(line) for line in (img / "download_failures.jsonl").read_text().splitlines()]
    assert [(f["line"], f["filename"]) for f in failures] == [(3, "b.png"), (4, "c.png"), (5, "d.png")]
    assert sorted(p.name for p in img.iterdir()) == ["a.png", "download_failures.jsonl"]


def test_redirects_to_other_schemes_are_not_followed():
    import urllib.error

    from ofaconv.clip.download import _fetch

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1:9/x.png")  # urllib's default opener follows this
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(urllib.error.URLError, match="unknown url type: ftp"):
            _fetch(f"http://127.0.0.1:{server.server_address[1]}/r.png", 5, 5, 0, 0.01, 1 << 20)
    finally:
        server.shutdown()
        server.server_close()


def test_images_are_checked_from_the_header_and_at_reduced_scale(monkeypatch):
    from PIL import ImageFile

    from ofaconv.clip.download import check_image

    def jpeg(size):
        buf = io.BytesIO()
        Image.new("RGB", size, "red").save(buf, format="JPEG")
        return buf.getvalue()

    big = jpeg((1200, 1000))
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (decoded.append(self.size), real_load(self))[1])
    assert check_image(big, max_pixels=1_000_000) == "1200x1000 pixels, above the limit of 1000000 (--max-pixels)"
    assert decoded == []  # refused from the header: no pixel decoded
    assert check_image(big, max_pixels=2_000_000) is None
    assert decoded == [(150, 125)]  # a 144-megapixel JPEG is held at 1/64 of its pixels, not as a full bitmap
    assert check_image(big[: len(big) // 2], max_pixels=0).startswith("OSError: image file is truncated")
