"""The web page at `/` in headless Chromium (Debian's `chromium`), driven over the
DevTools protocol on a pipe: upload a document, watch it compress, ask, and find the
streamed answer in the DOM; a screenshot is saved (``RCC_SERVE_SCREENSHOT=path`` keeps a copy)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")

from tests.conftest import REPO, tiny_rcc, tiny_tokenizer  # noqa: E402
from tests.serve_helpers import Server, request  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSKEY = REPO / "examples" / "passkey.txt"
QUESTION = "What is the pass key? The pass key is"


class Chromium:
    """Headless Chromium with ``--remote-debugging-pipe`` (commands on fd 3, replies on fd 4, NUL-separated JSON)."""

    def __init__(self, profile):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1000,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raise TimeoutError(method)

    def open(self, url: str, ready: str = "!!document.getElementById('model') && "
                                         "document.getElementById('model').textContent.startsWith('Model')") -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait(f"document.readyState === 'complete' && {ready}")

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not self.js(expression):
            if time.time() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "tiny"
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    model.config.instruction_mode = "manual"
    model.save_pretrained(str(path))
    return path


@pytest.mark.slow  # a server and a browser (13 s)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
@pytest.mark.parametrize("which", ["tiny", pytest.param("bundled", marks=pytest.mark.slow)])
def test_page_uploads_asks_and_streams_the_answer(which, tiny, tmp_path):
    model = tiny if which == "tiny" else "rcc-smollm2-135m"
    with Server(model, tmp_path / "store", threads=2) as srv:
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(srv.url + "/")
            root = browser.send("DOM.getDocument")["root"]["nodeId"]
            node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(PASSKEY)])
            browser.js("document.getElementById('compress').click()")
            browser.wait("!document.getElementById('ask').disabled")
            assert "ready" in browser.js("document.getElementById('status').textContent")
            browser.js(f"document.getElementById('question').value = {json.dumps(QUESTION)}; "
                       "document.getElementById('ask').click()")
            browser.wait("document.getElementById('answer').dataset.done === '1'")
            shown = browser.js("document.getElementById('answer').textContent")
            png = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        finally:
            browser.close()
        (tmp_path / "page.png").write_bytes(png)
        if os.environ.get("RCC_SERVE_SCREENSHOT"):
            (tmp_path / "page.png").replace(os.environ["RCC_SERVE_SCREENSHOT"])
        assert png.startswith(b"\x89PNG")
        [ctx] = request(srv.url + "/v1/contexts")[1]["data"]
        s, body = request(f"{srv.url}/v1/contexts/{ctx['id']}/ask", {"question": QUESTION}, "POST")
    assert s == 200 and shown == body["answer"] and shown, (shown, body)
    if which == "bundled":
        assert any(ch.isdigit() for ch in shown), shown


@pytest.mark.slow  # a server and a browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_docs_render_offline_and_another_origins_page_cannot_write(tiny, tmp_path):
    """Issue 24, cases 5 and 9 in a real browser: /docs renders from this server's files alone
    (its CSP allows nothing else), and a page of another origin that posts to the server (as
    text/plain, which needs no CORS preflight) plants nothing."""
    import http.server
    import threading

    from tests.serve_helpers import free_port

    with Server(tiny, tmp_path / "store", threads=2) as srv:
        port = free_port()
        evil = (f"<!doctype html><p id=done></p><script>"
                f"fetch('{srv.url}/v1/contexts', {{method: 'POST', mode: 'no-cors', body: 'planted', "
                f"headers: {{'Content-Type': 'text/plain'}}}}).catch(() => 0).finally(() => "
                f"document.getElementById('done').textContent = 'sent');</script>").encode()

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(evil)

            def log_message(self, *args):
                pass

        other = http.server.HTTPServer(("127.0.0.1", port), Page)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(f"http://localhost:{port}/", ready="(document.getElementById('done') || {}).textContent === 'sent'")
            browser.session = None
            try:
                import fastapi_offline  # noqa: F401
            except ImportError:
                fastapi_offline = None
            if fastapi_offline is not None:
                browser.open(srv.url + "/docs", ready="document.querySelectorAll('.opblock').length > 0")
                ops = browser.js("[...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)")
                assert "/v1/chat/completions" in ops and "/v1/contexts/{cid}/ask" in ops, ops
        finally:
            browser.close()
            other.shutdown()
        assert request(srv.url + "/v1/contexts")[1]["data"] == []


@pytest.mark.slow  # a server and a browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_page_appends_and_asks_over_several_contexts(tiny, tmp_path):
    """Issue 25: the page appends the text box to the current context (a child context), and
    ticking contexts in its list asks one question over them, as POST /v1/ask answers it."""
    text = PASSKEY.read_text()
    half = len(text) // 2
    with Server(tiny, tmp_path / "store", threads=2) as srv:
        browser = Chromium(tmp_path / "profile")
        try:
            browser.open(srv.url + "/")
            ready = "!document.getElementById('ask').disabled && !document.getElementById('append').disabled"
            browser.js(f"document.getElementById('text').value = {json.dumps(text[:half])}; "
                       "document.getElementById('compress').click()")
            browser.wait(ready)
            first = browser.js("document.getElementById('ctx').textContent").split()[1]
            browser.js(f"document.getElementById('text').value = {json.dumps(text[half:])}; "
                       "document.getElementById('append').click()")
            browser.wait(f"document.getElementById('ctx').textContent.includes('appended to {first}')")
            browser.wait(ready)
            child = browser.js("document.getElementById('ctx').textContent").split()[1]
            browser.js(f"document.getElementById('text').value = {json.dumps(text[half:])}; "
                       "document.getElementById('compress').click()")
            browser.wait(ready + " && document.querySelectorAll('#contexts input').length === 3")
            second = browser.js("document.getElementById('ctx').textContent").split()[1]
            for cid in (first, second):  # tick the two halves, in order
                browser.js(f"document.querySelector('#contexts input[value=\"{cid}\"]').click()")
            browser.js(f"document.getElementById('question').value = {json.dumps(QUESTION)}; "
                       "document.getElementById('ask').click()")
            browser.wait("document.getElementById('answer').dataset.done === '1'")
            shown = browser.js("document.getElementById('answer').textContent")
            meta = browser.js("document.getElementById('meta').textContent")
        finally:
            browser.close()
        rows = {r["id"]: r for r in request(srv.url + "/v1/contexts")[1]["data"]}
        assert rows[child]["parent"] == first and rows[child]["slots"] == rows[first]["slots"] + rows[second]["slots"]
        s, body = request(srv.url + "/v1/ask", {"context_ids": [first, second], "question": QUESTION}, "POST")
        assert s == 200 and shown == body["answer"], (shown, body)
        assert f"{body['slots']} slots" in meta, meta
        assert request(f"{srv.url}/v1/contexts/{child}/ask", {"question": QUESTION}, "POST")[1]["answer"] == shown
