"""`rcc serve` against an attacker and a careless client (issue 24): each numbered case of
the round-2 audit against a real server on 127.0.0.1 (a tiny random model with a real
tokenizer, so answers take milliseconds), and the cases that held, kept held.

1 oversized questions, messages, names, bodies and heads   2 stop strings
3 slow and silent clients, the connection cap               4 a client that goes away
5 other origins and other Host names                        6 sampling values
7 every error the API's JSON (500s with an id)              8 two servers on one store
9 /docs from shipped files
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import resource
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.conftest import REPO, saved_tiny_rcc, tiny_rcc, tiny_tokenizer  # noqa: E402
from tests.serve_helpers import Server, rcc_cli, request, sse, wait_ready  # noqa: E402

DOC = REPO / "examples" / "lighthouse.txt"
QUESTION = "Who kept the lamp burning?"
LIMITS = dict(header_timeout=3, body_timeout=3, keep_alive_timeout=1, max_connections=400, max_new_tokens=2000,
              max_question_tokens=64, max_stop_strings=4, max_stop_chars=32, max_messages=8, max_name_chars=40,
              max_body_bytes=65536, max_header_bytes=4096)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return saved_tiny_rcc(tmp_path_factory.mktemp("safety") / "tiny")


@pytest.fixture(scope="module")
def srv(tiny, tmp_path_factory):
    """One server with small limits and short timeouts, and a ready context (``srv.cid``)."""
    store = tmp_path_factory.mktemp("safety-store") / "store"
    args = [x for k, v in LIMITS.items() for x in (f"--{k.replace('_', '-')}", v)]
    with Server(tiny, store, *args) as server:
        server.store = store
        server.cid = request(server.url + "/v1/contexts", {"text": DOC.read_text()}, "POST")[1]["id"]
        wait_ready(server.url, server.cid)
        yield server


def ask(srv, body, headers=None, cid=None):
    return request(f"{srv.url}/v1/contexts/{cid or srv.cid}/ask", body, "POST", headers)


def error(res, status, *words):
    s, body = res
    assert s == status and isinstance(body, dict) and body["error"]["code"] == status, res
    for w in words:
        assert w in body["error"]["message"], res
    return body["error"]["message"]


def metric(srv, name: str) -> float:
    m = re.search(rf"^rcc_{name}_total (\S+)$", request(srv.url + "/metrics")[1], re.M)
    return float(m.group(1))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) / 1024


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """``(bytes the server sent, whether it closed the connection within timeout)``."""
    deadline, got = time.time() + timeout, b""
    while time.time() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.time()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, OSError):
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


def head(method: str, path: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def enough_files(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < n:
        pytest.skip(f"needs {n} open files (ulimit -n)")


# ------------------------------------------------------------------ case 1
@pytest.mark.slow  # a server process (shared by this module)
def test_1_oversized_requests_are_refused_before_any_work(srv):
    rss = rss_mib(srv.proc.pid)
    t = time.perf_counter()
    big = json.dumps({"question": "x" * (10 << 20)}).encode()  # the audit's 10 MiB question
    msg = error(request(f"{srv.url}/v1/contexts/{srv.cid}/ask", big, "POST", JSON), 413, "--max-body-bytes", "65536")
    assert str(len(big)) in msg and time.perf_counter() - t < 2
    assert rss_mib(srv.proc.pid) - rss < 100  # was 1.6 -> 7.9 GB and a 500 after 11 s
    # under the body limit, over the token limit: counted, named, refused before the queue
    error(ask(srv, {"question": "lamp " * 500}), 413, "tokens", "--max-question-tokens", "64")
    chat = {"context_id": srv.cid, "messages": [{"role": "user", "content": "hi"}] * 9}
    error(request(srv.url + "/v1/chat/completions", chat, "POST"), 413, "9 messages", "--max-messages")
    error(request(srv.url + "/v1/contexts", {"text": "a short text", "name": "n" * 41}, "POST"), 413,
          "41 characters", "--max-name-chars")
    # a chunked body is counted as it arrives
    with connect(srv) as s:
        s.sendall(b"POST /v1/contexts/%s/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" % srv.cid.encode())
        for _ in range(80):
            s.sendall(b"%x\r\n%s\r\n" % (1024, b"x" * 1024))
        got, closed = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 413") and b"counted as it arrived" in got and closed, got[:300]
    # a head over --max-header-bytes: 431 as JSON, closed
    with connect(srv) as s:
        s.sendall(head("GET", "/health", extra="X-Big: " + "y" * 5000 + "\r\n"))
        got, closed = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 431") and b'"code": 431' in got and b"--max-header-bytes" in got
    with connect(srv) as s:  # one still incomplete past the limit: h11's own check, as JSON too
        s.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"y" * 6000)
        got, closed = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 431") and b"--max-header-bytes" in got and closed, got
    assert request(srv.url + "/health")[0] == 200


# ------------------------------------------------------------------ case 2
@pytest.mark.slow
def test_2_stop_strings_are_bounded_and_cut_the_answer(srv):
    t = time.perf_counter()
    error(ask(srv, {"question": QUESTION, "stop": ["abcd"] * 2000}), 413, "2000 stop strings", "--max-stop-strings")
    error(ask(srv, {"question": QUESTION, "stop": ["z" * 20000] * 4}), 413, "--max-body-bytes")  # the audit's
    error(ask(srv, {"question": QUESTION, "stop": ["z" * 20000]}), 413, "20000 characters", "--max-stop-chars")
    assert time.perf_counter() - t < 2  # were 44 s and a 500 after 65 s (14.6 GiB)
    error(ask(srv, {"question": QUESTION, "stop": [""]}), 422, "empty")

    # the random model writes mostly bytes that are not UTF-8 (shown as U+FFFD): stop at a real character,
    # at best one after the start, from the first of a few questions that has one
    for question in (QUESTION, "What is the pass key?", "Where is the lighthouse?"):
        base = {"question": question, "mode": "manual", "max_tokens": 40}
        s, full = ask(srv, base)
        assert s == 200, full
        answer = full["answer"]
        firsts = [i for i, c in enumerate(answer) if c.strip() and c != "\ufffd" and answer.find(c) == i]
        if any(firsts):
            break
    if not firsts:
        pytest.skip(f"the random model's answer has no character to stop at: {answer!r}")
    stop = answer[max(firsts)]
    expected = answer[:answer.find(stop)].strip()
    assert expected != answer
    s, cut = ask(srv, {**base, "stop": [stop, "q" * 32, "never", "seen"]})  # at the limits: 4 of 32 characters
    assert s == 200 and cut["answer"] == expected and cut["finish_reason"] == "stop", (stop, cut, full)
    events = sse(f"{srv.url}/v1/contexts/{srv.cid}/ask", {**base, "stop": stop, "stream": True})
    assert "".join(e.get("delta", "") for e in events) == expected == events[-1]["answer"]


def test_stop_string_matcher_cost_does_not_depend_on_stop_length_times_vocabulary():
    """RowStops decodes the row and searches what the newest token can complete: 4 stops of
    128 characters over 300 steps take milliseconds (transformers' matcher precomputes
    vocabulary x stop length tables per stop string)."""
    import torch

    from rcc.serve.engine import Question, RowStops, Sink
    from rcc.serve.metrics import Metrics

    tok = tiny_tokenizer()
    stops = tuple(f"{c}" * 128 for c in "wxyz") + ("keeper",)
    q = Question("c", "q", "manual", 300, (("stop", stops),), Sink.__new__(Sink))
    crit = RowStops(tok, 0, "manual", [q], Metrics())
    text = tok("The lighthouse keeper kept the lamp burning.", add_special_tokens=False).input_ids
    ids = torch.tensor([(text * 40)[:300]])
    t = time.perf_counter()
    hits = [bool(crit(ids[:, :n], None)[0]) for n in range(1, 301)]
    assert time.perf_counter() - t < 1.0
    first = hits.index(True)
    assert "keeper" in tok.decode(ids[0, :first + 1]) and "keeper" not in tok.decode(ids[0, :first])


# ------------------------------------------------------------------ case 3
@pytest.mark.slow
def test_3_stalled_clients_are_dropped_while_others_are_served(srv):
    enough_files(2048)
    t0 = time.perf_counter()
    s, _ = ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 8})
    baseline = time.perf_counter() - t0
    assert s == 200
    t0 = time.perf_counter()
    silent = [connect(srv) for _ in range(100)]  # connect, send nothing
    trickle = [connect(srv) for _ in range(100)]  # a head a line at a time, never finished
    for sock in trickle:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    no_body = [connect(srv) for _ in range(100)]  # a body announced, never sent
    for sock in no_body:
        sock.sendall(head("POST", f"/v1/contexts/{srv.cid}/ask", 1000) + b'{"quest')
    huge = [connect(srv) for _ in range(10)]  # the audit's 10 GiB body: refused at once
    for sock in huge:
        sock.sendall(head("POST", "/v1/contexts", 10 << 30))
    stop = threading.Event()

    def drip():
        while not stop.wait(0.2):
            for sock in trickle:
                try:
                    sock.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # 310 stalled connections open: a real question and /health in normal time, once the server has
        # accepted them all (the first request waits behind the burst of accepts: ~0.8 s on a busy 2-core box)
        assert request(srv.url + "/health", timeout=5)[0] == 200
        opened = time.perf_counter() - t0
        t = time.perf_counter()
        s, body = ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 8})
        print(f"a question {time.perf_counter() - t:.3f} s with 310 stalled connections, {baseline:.3f} s before")
        assert s == 200 and time.perf_counter() - t < 3 * baseline + 0.5, (time.perf_counter() - t, baseline)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            assert request(srv.url + "/health", timeout=5)[0] == 200
            times.append(time.perf_counter() - t)
        print(f"/health {sorted(times)[1]:.3f} s (median of 3) with them; accepting them took {opened:.3f} s")
        assert sorted(times)[1] < 0.25, times
        assert time.perf_counter() - t0 < LIMITS["header_timeout"] + baseline, "the check ran after the deadlines"
        for sock in huge:  # answered at once; closed by the keep-alive or body deadline
            got, closed = read_until_closed(sock, LIMITS["body_timeout"] + 2)
            assert got.startswith(b"HTTP/1.1 413") and closed, got[:200]
        # every stalled one is answered 408 and closed within its deadline (+ slack)
        for group, words in ((silent, b"--header-timeout"), (trickle, b"--header-timeout"),
                             (no_body, b"--body-timeout")):
            for sock in group:
                got, closed = read_until_closed(sock, LIMITS["body_timeout"] + 3)
                assert closed and got.startswith(b"HTTP/1.1 408") and words in got, got[:300]
    finally:
        stop.set()
        dripper.join()
        for sock in silent + trickle + no_body + huge:
            sock.close()
    assert time.perf_counter() - t0 < 15
    # an idle keep-alive connection is closed after --keep-alive-timeout
    with connect(srv) as sock:
        sock.sendall(head("GET", "/health"))
        got, closed = read_until_closed(sock, LIMITS["keep_alive_timeout"] + 2)
    assert got.startswith(b"HTTP/1.1 200") and closed
    # past --max-connections: 503 and closed at once, until the stalled ones time out
    crowd = [connect(srv) for _ in range(LIMITS["max_connections"] + 20)]
    try:
        refused = 0
        for sock in crowd[-20:]:
            got, closed = read_until_closed(sock, 1)
            refused += got.startswith(b"HTTP/1.1 503") and b"--max-connections" in got and closed
        assert refused == 20
    finally:
        for sock in crowd:
            sock.close()
    deadline = time.time() + 10
    while request(srv.url + "/health", timeout=5)[0] != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert request(srv.url + "/health")[0] == 200


# ------------------------------------------------------------------ case 4
@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_4_a_client_that_goes_away_stops_its_generation(srv, stream):
    """1,000 tokens run about 10 s on this model: generated for nobody, they held the next question."""
    before, cancelled = metric(srv, "sampled_tokens"), metric(srv, "cancelled_questions")
    body = json.dumps({"question": QUESTION, "mode": "manual", "max_tokens": 1000, "stream": stream}).encode()
    sock = connect(srv)
    sock.sendall(head("POST", f"/v1/contexts/{srv.cid}/ask", len(body)) + body)
    if stream:
        got = b""
        while b'"delta"' not in got:
            got += sock.recv(65536)
    else:
        deadline = time.time() + 10
        while metric(srv, "sampled_tokens") - before < 10 and time.time() < deadline:
            time.sleep(0.02)
    at_close = metric(srv, "sampled_tokens") - before
    sock.close()
    t = time.perf_counter()
    s, short = ask(srv, {"question": "Who?", "mode": "manual", "max_tokens": 4})
    latency = time.perf_counter() - t
    assert s == 200 and latency < 2, latency
    deadline = time.time() + 5
    while metric(srv, "cancelled_questions") == cancelled and time.time() < deadline:
        time.sleep(0.05)
    after_close = metric(srv, "sampled_tokens") - before - at_close - 4  # 4: the short question's
    assert metric(srv, "cancelled_questions") == cancelled + 1
    assert 0 < at_close < 200 and after_close <= 20, (at_close, after_close)


# ------------------------------------------------------------------ case 5
@pytest.mark.slow
def test_5_other_origins_cannot_write_and_other_host_names_cannot_read(srv):
    url, port = srv.url, srv.port
    count = len(request(url + "/v1/contexts")[1]["data"])
    evil = {"Origin": "http://evil.example"}
    # the audit's text/plain upload from another origin (a form can send it): refused
    error(request(url + "/v1/contexts", b"planted", "POST", {"Content-Type": "text/plain", **evil}), 403,
          "cross-origin")
    error(request(url + "/v1/contexts", b"planted", "POST", {"Content-Type": "text/plain"}), 415,
          "application/json")
    error(request(url + "/v1/contexts", {"text": "planted"}, "POST", evil), 403, "--cors-origins")
    error(request(url + "/v1/contexts", {"text": "planted"}, "POST", {"Sec-Fetch-Site": "cross-site"}), 403)
    error(request(f"{url}/v1/contexts/{srv.cid}", method="DELETE", headers={"Origin": "null"}), 403)
    error(ask(srv, {"question": QUESTION}, {"Origin": f"http://localhost:{port + 1}"}), 403)
    assert len(request(url + "/v1/contexts")[1]["data"]) == count
    # DNS rebinding: evil.example resolving to 127.0.0.1 still says Host: evil.example
    for path in ("/v1/contexts", "/health", f"/v1/contexts/{srv.cid}"):
        error(request(url + path, headers={"Host": f"evil.example:{port}"}), 403, "--allowed-hosts")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"app.localhost:{port}"):
        assert request(url + "/v1/contexts", headers={"Host": host})[0] == 200, host
    # the page's own requests (same origin) pass; nothing carries CORS headers
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert ask(srv, {"question": QUESTION, "max_tokens": 4, "mode": "manual"}, own)[0] == 200
    req = __import__("urllib.request").request.Request(url + "/v1/contexts", headers=evil)
    with __import__("urllib.request").request.urlopen(req) as res:
        assert res.headers.get("access-control-allow-origin") is None
        assert res.headers["x-frame-options"] == "DENY" and res.headers["x-content-type-options"] == "nosniff"
    s, _ = request(url + "/v1/contexts", method="OPTIONS", headers={**evil, "Access-Control-Request-Method": "POST"})
    assert s == 405


@pytest.mark.slow  # a server process, and `rcc serve` refusals
def test_5_hosts_and_origins_can_be_allowed_and_a_public_host_needs_a_key(tiny, tmp_path):
    res = rcc_cli("serve", "--model", tiny, "--store", tmp_path / "s0", "--host", "0.0.0.0", timeout=120)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "--api-key-file" in last and "--insecure" in last and "Traceback" not in res.stderr
    app = "http://app.example"
    with Server(tiny, tmp_path / "store", "--allowed-hosts", "rcc.test,.lan", "--cors-origins", app) as srv:
        for host in ("rcc.test", "box.lan", "rcc.test:80"):
            assert request(srv.url + "/health", headers={"Host": host})[0] == 200, host
        error(request(srv.url + "/health", headers={"Host": "other.test"}), 403)
        s, _ = request(srv.url + "/v1/contexts", method="OPTIONS",
                       headers={"Origin": app, "Access-Control-Request-Method": "POST",
                                "Access-Control-Request-Headers": "content-type"})
        assert s == 200
        s, row = request(srv.url + "/v1/contexts", {"text": "An allowed page's document."}, "POST", {"Origin": app})
        assert s == 202, row
        error(request(srv.url + "/v1/contexts", {"text": "x"}, "POST", {"Origin": "http://evil.example"}), 403)


# ------------------------------------------------------------------ case 6
BAD_SAMPLING = [({"temperature": 1e-300}, "temperature"), ({"temperature": 1e308}, "temperature"),
                ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                ({"top_k": -1}, "top_k"), ({"top_k": 10**30}, "top_k"), ({"top_k": 2.5}, "top_k"),
                ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 1e-300}, "repetition"),
                ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
                ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"stream": "yes"}, "stream"),
                ({"temperature": True}, "temperature")]


@pytest.mark.slow
def test_6_sampling_values_are_finite_and_in_range(srv):
    for bad, word in BAD_SAMPLING:
        error(ask(srv, {"question": QUESTION, **bad}), 422, word)
    for literal in ("Infinity", "-Infinity", "NaN"):  # JSON that Python's parser reads as numbers
        for field in ("temperature", "top_p", "repetition_penalty"):
            raw = f'{{"question": "q", "{field}": {literal}}}'.encode()
            error(request(f"{srv.url}/v1/contexts/{srv.cid}/ask", raw, "POST", JSON), 422, field)
    chat = {"context_id": srv.cid, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}
    error(request(srv.url + "/v1/chat/completions", {**chat, "presence_penalty": 0.5}, "POST"), 422,
          "presence_penalty", "repetition_penalty")
    error(request(srv.url + "/v1/chat/completions", {**chat, "max_completion_tokens": True}, "POST"), 422)
    # temperature 0 is greedy, as in the OpenAI API, whatever top_p says
    greedy = ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 12})[1]["answer"]
    for extra in ({"temperature": 0}, {"temperature": 0, "top_p": 1}, {"temperature": 0, "top_k": 5}):
        s, body = ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 12, **extra})
        assert s == 200 and body["answer"] == greedy, extra
    s, body = ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 12, "temperature": 0.7, "top_k": 0})
    assert s == 200


def test_sampling_rules_are_the_same_for_the_cli_the_library_and_the_vllm_engine():
    from rcc.errors import RCCError
    from rcc.generation import check_sampling, generation_options
    from rcc.vllm.generate import sampling_for

    for bad, _ in BAD_SAMPLING:
        if set(bad) & {"max_tokens", "stream"}:
            continue
        for call, kwargs in ((generation_options, {}), (check_sampling, {"name": str}),
                             (lambda **kw: sampling_for(8, 0, **kw), {})):  # sampling_for checks before importing vLLM
            with pytest.raises(RCCError):
                call(**bad, **kwargs)
    with pytest.raises(RCCError, match="--max-new-tokens True"):
        generation_options(max_new_tokens=True)
    with pytest.raises(RCCError, match="max_new_tokens"):
        sampling_for(True, 0)
    assert generation_options(temperature=0, top_p=0.9) == {"max_new_tokens": 128}  # greedy
    assert generation_options(temperature=0.7, top_k=0) == {"max_new_tokens": 128, "do_sample": True,
                                                            "temperature": 0.7}
    with pytest.raises(RCCError, match="greedy"):
        generation_options(do_sample=True, temperature=0)


# ------------------------------------------------------------------ case 7
@pytest.mark.slow
def test_7_malformed_content_parts_and_other_mistakes_are_json_errors(srv):
    base = {"context_id": srv.cid, "max_tokens": 4}
    for content, words in (([{"type": "text", "text": 5}], ["text"]), ([{"type": "text", "text": None}], ["'text'"]),
                           ([{"type": "text"}], ["'text'"]), ([{"type": "image_url", "image_url": {}}], ["image_url"]),
                           ([5], ["content"]), ([{"text": "no type"}], ["type"]), (7, ["content"])):
        msg = error(request(srv.url + "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": content}]},
                            "POST"), 422, *words)
        assert "Traceback" not in msg
    s, ok = request(srv.url + "/v1/chat/completions",
                    {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]}, "POST")
    assert s == 200 and ok["object"] == "chat.completion"
    error(ask(srv, {"question": "lone \ud800 surrogate"}), 422, "question", "unicode")
    error(request(srv.url + "/v1/contexts", {"text": "lone \ud800"}, "POST"), 422)
    error(request(srv.url + "/health", {"x": 1}, "POST"), 405)
    error(request(srv.url + "/v1/nothing"), 404, "/docs")
    with connect(srv) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        got, closed = read_until_closed(sock, 5)
    assert got.startswith(b"HTTP/1.1 400") and b'"code": 400' in got and closed, got


def test_7_an_unexpected_exception_is_a_500_with_an_id_and_a_logged_traceback(tmp_path, caplog):
    """A fault injected into a real engine behind a real uvicorn on 127.0.0.1 (in this process):
    the client gets JSON naming an id, the log has the traceback under it."""
    import uvicorn

    from rcc.serve.app import create_app
    from rcc.serve.config import ServeConfig
    from rcc.serve.connections import protocol_class
    from rcc.serve.engine import Engine
    from rcc.serve.store import Store
    from tests.serve_helpers import free_port

    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    cfg = ServeConfig(model="tiny", store=str(tmp_path / "store"), port=free_port())
    engine = Engine(model, Store(cfg.store), cfg).start()

    def broken(*a, **k):
        raise RuntimeError("injected fault: secret internals")

    engine.add_context = broken
    engine._generate = broken
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=cfg.port, log_level="critical",
                                           http=protocol_class(cfg), lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.port}"
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with caplog.at_level("ERROR", logger="rcc.serve.engine"):
            msg = error(request(url + "/v1/contexts", {"text": "a document"}, "POST"), 500, "internal server error")
            eid = re.search(r"id ([0-9a-f]{12})", msg).group(1)
            assert "secret" not in msg and "Traceback" not in msg
            # the worker's failure: the question was queued, generation raised
            ids = model.tokenizer("A short document about a lamp.", add_special_tokens=False,
                                  return_tensors="pt").input_ids
            from rcc.serve.store import context_id

            cid = context_id("doc", engine.model_id)
            path = model.compress(ids).save(engine.store.memory_path(cid))
            engine.store.add(cid, "doc", None, ids.shape[1], 1, engine.model_id)
            engine.store.update(cid, status="ready", slots=8, bytes=path.stat().st_size)
            msg2 = error(request(f"{url}/v1/contexts/{cid}/ask", {"question": "q", "mode": "manual"}, "POST"), 500,
                         "internal server error")
            assert "secret" not in msg2
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert eid in logged and "injected fault" in caplog.text and "Traceback" in caplog.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
        engine.store.close()


# ------------------------------------------------------------------ case 8
@pytest.mark.slow
def test_8_a_second_server_on_the_same_store_is_refused(srv, tiny):
    t = time.perf_counter()
    res = rcc_cli("serve", "--model", tiny, "--store", srv.store, "--port", 0, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "in use by another rcc serve" in lines[-1] and str(srv.proc.pid) in lines[-1], lines
    assert "UNTRAINED" not in res.stderr  # refused before the model was loaded
    assert time.perf_counter() - t < 60
    assert request(srv.url + f"/v1/contexts/{srv.cid}")[1]["status"] == "ready"  # the first one serves on


# ------------------------------------------------------------------ case 9
@pytest.mark.slow
def test_9_docs_come_from_this_server_only(srv):
    s, page = request(srv.url + "/docs")
    try:
        import fastapi_offline  # noqa: F401
    except ImportError:  # installed with the serve extra; without it the page says so (and nothing loads)
        error((s, page), 404, "fastapi-offline", "/openapi.json")
        return
    assert s == 200 and "cdn" not in page.lower() and "http" not in page.replace("http-equiv", ""), page
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(r.startswith("/docs/") for r in refs), refs
    for ref in refs:
        with __import__("urllib.request").request.urlopen(srv.url + ref) as res:
            assert res.status == 200 and len(res.read()) > 100, ref
    req = __import__("urllib.request").request.Request(srv.url + "/docs")
    with __import__("urllib.request").request.urlopen(req) as res:
        csp = res.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert request(srv.url + "/docs/../../etc/passwd")[0] == 404
    schema = request(srv.url + "/openapi.json")[1]
    assert "/v1/chat/completions" in schema["paths"] and schema["components"]["securitySchemes"]["bearer"]


# --------------------------------------------------------- what held, held
@pytest.mark.slow
def test_held_cases_stay_held(srv):
    url = srv.url
    # path traversal in ids: 404, never a file
    for path in ("/v1/contexts/..%2F..%2Fetc%2Fpasswd", "/v1/contexts/%2e%2e", "/v1/contexts/..%2Findex.sqlite3"):
        assert request(url + path)[0] == 404, path
        assert request(url + path, method="DELETE")[0] == 404, path
    assert ask(srv, {"question": "q"}, cid="..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert (srv.store / "index.sqlite3").is_file()
    # 20 concurrent uploads of one document: one id, compressed once
    text = DOC.read_text()[:2000] + " (held)"
    compressed = metric(srv, "compressed_tokens")
    with cf.ThreadPoolExecutor(20) as pool:
        rows = list(pool.map(lambda _: request(url + "/v1/contexts", {"text": text}, "POST"), range(20)))
    assert {s for s, _ in rows} <= {200, 202} and len({r["id"] for _, r in rows}) == 1, rows
    row = wait_ready(url, rows[0][1]["id"])
    assert metric(srv, "compressed_tokens") - compressed == row["tokens"]
    # DELETE during a compression: gone, files too, and the server goes on
    big = request(url + "/v1/contexts", {"text": DOC.read_text() * 30}, "POST")[1]
    assert request(f"{url}/v1/contexts/{big['id']}", method="DELETE")[0] == 200
    assert request(f"{url}/v1/contexts/{big['id']}")[0] == 404
    # DELETE during a streamed answer: the stream ends with its answer, the context is gone
    cid = row["id"]
    box = {}
    streamer = threading.Thread(target=lambda: box.update(events=sse(
        f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "mode": "manual", "max_tokens": 300, "stream": True})))
    streamer.start()
    time.sleep(0.2)
    assert request(f"{url}/v1/contexts/{cid}", method="DELETE")[0] == 200
    streamer.join(timeout=60)
    assert box["events"][-1].get("done") is True
    assert request(f"{url}/v1/contexts/{cid}")[0] == 404
    deadline = time.time() + 30
    while (list(srv.store.glob(f"{big['id']}.*")) or list(srv.store.glob(f"{cid}.*"))) and time.time() < deadline:
        time.sleep(0.1)
    assert not list(srv.store.glob(f"{big['id']}.*")) and not list(srv.store.glob(f"{cid}.*"))
    assert ask(srv, {"question": QUESTION, "mode": "manual", "max_tokens": 4})[0] == 200
