"""A real `rcc serve` in a subprocess on a free 127.0.0.1 port, and small HTTP helpers (stdlib only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH the tests run with."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``rcc serve --model MODEL --store STORE *extra`` until :meth:`stop` or :meth:`kill9`."""

    def __init__(self, model, store, *extra, threads: int = 1, ready_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(store).with_name(Path(store).name + f"-{self.port}.log")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=python_path(), OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rcc.cli", "serve", "--model", str(model), "--store", str(store),
             "--port", str(self.port), *map(str, extra)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rcc serve exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if request(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.kill9()
        raise RuntimeError(f"rcc serve did not come up: {self.log.read_text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def request(url: str, body=None, method: str | None = None, headers: dict | None = None, timeout: float = 300):
    """``(status, parsed JSON or text)``; ``body`` a dict (JSON) or bytes."""
    headers = dict(headers or {})
    data = body
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            status, raw, kind = res.status, res.read(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in kind else raw.decode())


def sse(url: str, body: dict, headers: dict | None = None, timeout: float = 300) -> list:
    """The ``data:`` payloads of a server-sent-event response (JSON decoded; ``[DONE]`` kept as a string)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        for line in res:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                payload = line[6:]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def multipart(filename: str, data: bytes, field: str = "file") -> tuple[bytes, dict]:
    boundary = "rccboundary7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(url: str, path: Path, headers: dict | None = None):
    body, h = multipart(path.name, path.read_bytes())
    return request(url + "/v1/contexts", body, "POST", {**h, **(headers or {})})


def wait_ready(url: str, cid: str, timeout: float = 600, headers: dict | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, row = request(f"{url}/v1/contexts/{cid}", headers=headers)
        assert status == 200, row
        if row["status"] == "ready":
            return row
        assert row["status"] != "failed", row
        time.sleep(0.1)
    raise TimeoutError(f"context {cid} not ready after {timeout} s")


def rcc_cli(*args, timeout: float = 600, threads: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=python_path(), OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-m", "rcc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
