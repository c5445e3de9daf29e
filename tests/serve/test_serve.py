"""`rcc serve` against a real server on 127.0.0.1 (a subprocess started by each test):
contexts, questions as JSON / SSE / the official openai client, answers equal to
`rcc ask`, batching under concurrent clients, errors, and kill -9 restarts."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.conftest import REPO, saved_tiny_rcc  # noqa: E402
from tests.serve_helpers import Server, multipart, rcc_cli, request, sse, upload, wait_ready  # noqa: E402

DOC = REPO / "examples" / "lighthouse.txt"
PASSKEY = REPO / "examples" / "passkey.txt"
QUESTION = "Who kept the lamp burning?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random RCC model (window 64, ratio 8) with a tokenizer, saved to a folder."""
    return saved_tiny_rcc(tmp_path_factory.mktemp("serve") / "tiny")


def ask(url, cid, question=QUESTION, **kw):
    return request(f"{url}/v1/contexts/{cid}/ask", {"question": question, **kw}, "POST")


@pytest.mark.slow  # a server process (16 s)
def test_contexts_questions_stream_and_openai_client_answer_as_rcc_ask(tiny, tmp_path, one_thread):
    from openai import OpenAI

    from rcc.loading import load_model
    from rcc.ask import ask as lib_ask

    with Server(tiny, tmp_path / "store") as srv:
        url = srv.url
        status, row = upload(url, DOC)
        assert status == 202 and row["status"] in ("queued", "compressing", "ready"), row
        cid = row["id"]
        ready = wait_ready(url, cid)
        assert ready["slots"] == ready["progress"]["windows_total"] * 8 and ready["tokens"] > 500
        assert ready["progress"]["windows_done"] == ready["progress"]["windows_total"]
        # the same document again, as JSON this time, is the same entry
        status, again = request(url + "/v1/contexts", {"text": DOC.read_text()}, "POST")
        assert status == 200 and again["id"] == cid and again["status"] == "ready"
        assert [c["id"] for c in request(url + "/v1/contexts")[1]["data"]] == [cid]

        status, manual = ask(url, cid, mode="manual", max_tokens=24)
        assert status == 200 and manual["mode"] == "manual" and manual["slots"] == ready["slots"], manual
        status, recon = ask(url, cid, mode="reconstruct", max_tokens=24)
        assert status == 200 and recon["reconstructed_question"] is not None, recon

        # equal to `rcc ask` on the same input (manual: the CLI compresses the context alone)
        res = rcc_cli("ask", "--model", tiny, "--context", DOC, "-q", QUESTION, "--mode", "manual",
                      "--max-new-tokens", 24, "--json", "--quiet")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[-1])["answer"] == manual["answer"]
        # reconstruct: the question's windows extend the stored memory, as `rcc ask --memory` does
        model = load_model(str(tiny), dtype=torch.float32, device="cpu")
        ids = model.tokenizer(DOC.read_text(), add_special_tokens=False, return_tensors="pt").input_ids
        memory = model.compress(ids, window_batch_size=8)
        ref = lib_ask(model, memory, QUESTION, mode="reconstruct", max_new_tokens=24)  # extends the memory
        assert (recon["answer"], recon["reconstructed_question"]) == (ref.answer, ref.reconstructed_question)

        # the SSE stream's deltas add up to the answer
        events = sse(f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "mode": "manual", "max_tokens": 24,
                                                      "stream": True})
        deltas = [e["delta"] for e in events if "delta" in e]
        assert len(deltas) >= 1 and events[-1]["done"] is True
        assert "".join(deltas) == events[-1]["answer"] == manual["answer"]

        # the official openai client against /v1/chat/completions, streaming and not
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        [m] = client.models.list().data
        assert m.id == "tiny"
        out = client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=24, extra_body={"context_id": cid, "mode": "manual"})
        assert out.choices[0].message.content == manual["answer"]
        assert out.choices[0].finish_reason == manual["finish_reason"]
        assert out.usage.completion_tokens == manual["completion_tokens"]
        stream = client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=24, stream=True, extra_body={"context_id": cid,
                                                                                        "mode": "manual"})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == manual["answer"]
        assert chunks[-1].choices[0].finish_reason == manual["finish_reason"]

        health = request(url + "/health")[1]
        assert health["status"] == "ok" and health["model"] == "tiny"
        metrics = request(url + "/metrics")[1]
        assert re.search(r'rcc_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} 2', metrics)
        assert re.search(r"rcc_batched_questions_total 5\b", metrics), metrics
        assert "rcc_queue_depth 0" in metrics and "rcc_cache_hits_total" in metrics

        assert request(f"{url}/v1/contexts/{cid}", method="DELETE")[0] == 200
        assert request(f"{url}/v1/contexts/{cid}")[0] == 404
        assert not list((tmp_path / "store").glob("*.rcc"))


@pytest.mark.slow  # a server process (10 s)
def test_errors_have_their_status_and_a_message(tiny, tmp_path):
    from openai import AuthenticationError, OpenAI

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    auth = {"Authorization": "Bearer s3cret"}
    short = tmp_path / "short.txt"
    short.write_text(DOC.read_text()[:300])
    with Server(tiny, tmp_path / "store", "--api-key-file", key_file, "--max-context-tokens", 200,
                "--max-concurrent", 1, "--max-new-tokens", 256) as srv:
        url = srv.url

        def error(status, body, *words):
            assert isinstance(body, dict) and body["error"]["code"] == status, body
            for w in words:
                assert w in body["error"]["message"], body

        # 401: no key, a wrong key (also through the openai client); the page and /health stay open
        error(401, request(url + "/v1/contexts")[1], "API key")
        s, body = request(url + "/v1/contexts", headers={"Authorization": "Bearer nope"})
        assert s == 401
        error(401, body, "Authorization: Bearer")
        with pytest.raises(AuthenticationError, match="API key"):
            OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert request(url + "/health")[0] == 200 and request(url + "/")[0] == 200

        # 413: a document over --max-context-tokens
        s, body = upload(url, DOC, headers=auth)
        assert s == 413
        error(413, body, "--max-context-tokens", "200")
        # 422: a malformed upload, no file field, not UTF-8, empty, bad JSON
        good, h = multipart("a.txt", b"some text")
        for cut, header in ((good[:-25], h), (good, {"Content-Type": "multipart/form-data"})):  # truncated, no boundary
            s, body = request(url + "/v1/contexts", cut, "POST", {**header, **auth})
            assert s == 422
            error(422, body, "multipart", "'file'")
        wrong_field, h = multipart("a.txt", b"text", field="doc")
        s, body = request(url + "/v1/contexts", wrong_field, "POST", {**h, **auth})
        assert s == 422
        error(422, body, "'file'")
        s, body = request(url + "/v1/contexts", b"caf\xe9 au lait", "POST", {"Content-Type": "text/plain", **auth})
        assert s == 422
        error(422, body, "UTF-8", "offset 3")
        s, body = request(url + "/v1/contexts", {"text": "  \n"}, "POST", auth)
        assert s == 422
        error(422, body, "empty")
        s, body = request(url + "/v1/contexts", b"{not json", "POST", {"Content-Type": "application/json", **auth})
        assert s == 422
        error(422, body, "JSON")

        s, row = upload(url, short, headers=auth)
        assert s == 202, row
        cid = row["id"]
        wait_ready(url, cid, headers=auth)
        # 404: unknown ids (get, ask, delete, chat), unknown routes, unknown model
        for method, path, body in (("GET", "/v1/contexts/nope", None), ("DELETE", "/v1/contexts/nope", None),
                                   ("POST", "/v1/contexts/nope/ask", {"question": "q"}), ("GET", "/v2/x", None)):
            s, b = request(url + path, body, method, auth)
            assert s == 404, (path, b)
            error(404, b, "GET /v1/contexts" if "contexts" in path else "/docs")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "context_id": "nope"}
        s, b = request(url + "/v1/chat/completions", chat, "POST", auth)
        assert s == 404
        error(404, b, "nope")
        s, b = request(url + "/v1/chat/completions", {**chat, "model": "gpt-4", "context_id": cid}, "POST", auth)
        assert s == 404
        error(404, b, "GET /v1/models")
        # 422: negative / over-limit max_tokens, an empty question, a bad mode, chat without context_id
        for bad, words in (({"max_tokens": -1}, ["max_tokens", "at least 1"]),
                           ({"max_tokens": 100000}, ["limit of 256"]), ({"question": ""}, ["question"]),
                           ({"mode": "telepathy"}, ["mode"]), ({"temperature": -2}, ["temperature"])):
            s, b = request(f"{url}/v1/contexts/{cid}/ask", {"question": "q", **bad}, "POST", auth)
            assert s == 422, (bad, b)
            error(422, b, *words)
        s, b = request(url + "/v1/chat/completions", {**chat, "context_id": None}, "POST", auth)
        assert s == 422
        error(422, b, "context_id", "extra_body")
        s, b = request(url + "/v1/chat/completions", {**chat, "context_id": cid, "max_tokens": -5}, "POST", auth)
        assert s == 422
        error(422, b, "max_tokens")

        # 429: past --max-concurrent 1, while another question runs
        def one(_):
            return request(f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "max_tokens": 200}, "POST", auth)

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        codes = sorted(s for s, _ in results)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        error(429, next(b for s, b in results if s == 429), "--max-concurrent", "retry")
        metrics = request(url + "/metrics", headers=auth)[1]
        assert re.search(r"rcc_rejected_queue_full_total [1-9]", metrics)


@pytest.mark.slow  # `rcc serve` processes (8 s)
def test_bad_server_options_are_one_line_errors(tmp_path):
    for args, words in ((["--api-key-file", tmp_path / "missing"], "--api-key-file"),
                        (["--max-batch", 0], "--max-batch must be positive")):
        res = rcc_cli("serve", "--store", tmp_path / "store", *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert words in res.stderr.strip().splitlines()[-1], res.stderr


@pytest.mark.slow  # a server process (9 s)
def test_concurrent_clients_on_two_contexts_are_batched_and_answer_alike(tiny, tmp_path):
    n_clients = 16
    with Server(tiny, tmp_path / "store", "--max-batch", 16) as srv:
        url = srv.url
        cids = [upload(url, p)[1]["id"] for p in (DOC, PASSKEY)]
        for cid in cids:
            wait_ready(url, cid)
        questions = [QUESTION, "What is the pass key?"]
        single = {(c, q): ask(url, c, q, mode="manual", max_tokens=16)[1]["answer"] for c in cids for q in questions}
        before = request(url + "/metrics")[1]

        def client(i):
            c, q = cids[i % 2], questions[(i // 2) % 2]
            t = time.perf_counter()
            if i % 4 == 3:
                events = sse(f"{url}/v1/contexts/{c}/ask", {"question": q, "mode": "manual", "max_tokens": 16,
                                                            "stream": True})
                return (c, q), 200, "".join(e.get("delta", "") for e in events), time.perf_counter() - t
            s, body = ask(url, c, q, mode="manual", max_tokens=16)
            return (c, q), s, body.get("answer"), time.perf_counter() - t

        with cf.ThreadPoolExecutor(n_clients) as pool:
            results = list(pool.map(client, range(n_clients)))
        assert [s for _, s, _, _ in results] == [200] * n_clients
        for key, _, answer, _ in results:
            assert answer == single[key], key
        after = request(url + "/metrics")[1]

        def count(text, name):
            return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

        questions_run = count(after, "rcc_batched_questions_total") - count(before, "rcc_batched_questions_total")
        calls = count(after, "rcc_batches_total") - count(before, "rcc_batches_total")
        assert questions_run == n_clients and calls < n_clients, (questions_run, calls)


@pytest.mark.slow  # server processes killed and restarted (23 s)
def test_kill9_during_compression_and_during_a_question(tiny, tmp_path):
    store = tmp_path / "store"
    big = tmp_path / "big.txt"
    big.write_text(DOC.read_text() * 40)  # ~28k tokens: 440 windows, compressed one at a time below
    srv = Server(tiny, store, "--window-batch-size", 1)
    try:
        cid = upload(srv.url, DOC)[1]["id"]
        wait_ready(srv.url, cid)
        before = ask(srv.url, cid, mode="manual", max_tokens=16)[1]
        big_id = upload(srv.url, big)[1]["id"]
        while (row := request(f"{srv.url}/v1/contexts/{big_id}")[1])["progress"]["windows_done"] < 5:
            assert row["status"] in ("queued", "compressing"), row
            time.sleep(0.05)
        s, body = ask(srv.url, big_id)  # never answered from a half-made memory
        assert s == 409 and "poll GET" in body["error"]["message"], body
        # a question on a ready context is answered between compression steps, not after the job
        assert ask(srv.url, cid, mode="manual", max_tokens=16)[1] == before
        row = request(f"{srv.url}/v1/contexts/{big_id}")[1]
        assert row["status"] == "compressing" and row["progress"]["windows_done"] < row["progress"]["windows_total"]
        srv.kill9()
        assert not (store / f"{big_id}.rcc").exists()

        srv = Server(tiny, store, "--window-batch-size", 8)
        rows = {r["id"]: r for r in request(srv.url + "/v1/contexts")[1]["data"]}
        assert rows[cid]["status"] == "ready" and rows[big_id]["status"] in ("queued", "compressing", "ready")
        assert ask(srv.url, cid, mode="manual", max_tokens=16)[1] == before  # the finished context, as before
        resumed = wait_ready(srv.url, big_id)  # the interrupted job resumed after the restart
        assert resumed["slots"] == resumed["progress"]["windows_total"] * 8
        assert ask(srv.url, big_id, mode="manual", max_tokens=4)[0] == 200

        # kill -9 while questions run: distinct budgets are not batched, so they queue one after another
        def one(budget):
            return ask(srv.url, cid, mode="manual", max_tokens=budget)

        with cf.ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(one, 100 + i) for i in range(8)]
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            srv.kill9()
            cut = [f for f in pending if f.exception(timeout=60) is not None]
        assert cut, "every question finished before the kill"
        srv = Server(tiny, store)
        assert ask(srv.url, cid, mode="manual", max_tokens=16)[1] == before
        rows = {r["id"]: r["status"] for r in request(srv.url + "/v1/contexts")[1]["data"]}
        assert rows == {cid: "ready", big_id: "ready"}
        assert not list(store.glob(".*.part")) and not list(store.glob("*.txt"))
    finally:
        srv.stop()


@pytest.mark.slow
def test_bundled_model_end_to_end_equals_rcc_ask(tmp_path):
    """The README's pass-key example through the server (the bundled model) and through `rcc ask`."""
    from openai import OpenAI

    question = "What is the pass key? The pass key is"
    with Server("rcc-smollm2-135m", tmp_path / "store", threads=2) as srv:
        s, row = upload(srv.url, PASSKEY)
        assert s == 202
        wait_ready(srv.url, row["id"])
        s, body = ask(srv.url, row["id"], question)
        assert s == 200 and body["mode"] == "manual", body
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="rcc-smollm2-135m", messages=[{"role": "user", "content": question}],
                                             extra_body={"context_id": row["id"]})
    res = rcc_cli("ask", "--context", PASSKEY, "--question", question, "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    expected = json.loads(res.stdout.splitlines()[-1])["answer"]
    assert body["answer"] == expected == out.choices[0].message.content
    assert re.search(r"\d{4,}", expected), expected  # the bundled model finds a key-shaped number


def test_streamed_text_never_shows_a_stop_marker_or_half_a_character():
    from rcc.prompts import ASSISTANT
    from rcc.prompts import CHATML

    eos = "<|endoftext|>"
    assert CHATML.visible_answer(" The key is 42", "manual", eos) == "The key is 42"
    assert CHATML.visible_answer("The key is 42<|im", "manual", eos) == "The key is 42"  # maybe a marker: held back
    assert CHATML.visible_answer("The key is 42<|im_end|>junk", "manual", eos) == "The key is 42"
    assert CHATML.visible_answer("42<|endoftext|><|endoftext|>", "manual", eos) == "42"
    assert CHATML.visible_answer("caf\ufffd", "manual", eos) == "caf"  # a multi-byte character not yet complete
    assert CHATML.visible_answer("What is the key?<|im_end|>\n<|im_start|>assis", "reconstruct", eos) == ""
    assert CHATML.visible_answer("What is the key?" + ASSISTANT + "42 and", "reconstruct", eos) == "42 and"


@pytest.mark.slow
def test_load_16_concurrent_clients_on_two_contexts_with_the_bundled_model(tmp_path):
    """scripts/serve_load.py without the `rcc ask` comparison: zero errors, every answer the single-client one."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_load.py"), "--clients", "16", "--cli-calls", "0",
                          "-o", out], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == 0 and result["mismatches"] == 0
    assert result["generate_calls"] < 2 + 2 * 16  # the concurrent questions were batched
    assert result["appends"]["children"] == 1 and result["appends"]["combined_questions"] == 8  # under load


@pytest.mark.slow  # a server process, restarted once (20 s)
def test_append_and_questions_over_several_contexts(tiny, tmp_path):
    """POST /v1/contexts/{id}/append makes a child that answers as the library's append;
    /v1/ask and the chat route's context_ids read several contexts as one, as
    RCCModel.combine does; limits are 413 before any work; deleting a parent keeps its
    child; a kill -9 during an append leaves the parent and no half child."""
    from rcc.loading import load_model

    text = DOC.read_text()
    half = len(text) // 2
    first, second = text[:half], text[half:]
    store = tmp_path / "store"
    srv = Server(tiny, store, "--max-contexts-per-question", 3, "--window-batch-size", 1)
    try:
        url = srv.url
        a = wait_ready(url, request(url + "/v1/contexts", {"text": first}, "POST")[1]["id"])
        b = wait_ready(url, request(url + "/v1/contexts", {"text": second}, "POST")[1]["id"])
        status, row = request(f"{url}/v1/contexts/{a['id']}/append", {"text": second, "name": "both"}, "POST")
        assert status == 202 and row["parent"] == a["id"] and row["id"] not in (a["id"], b["id"]), row
        child = wait_ready(url, row["id"])
        assert child["tokens"] == a["tokens"] + b["tokens"] and child["slots"] == a["slots"] + b["slots"]
        assert child["progress"]["windows_total"] == b["slots"] // 8  # only the new windows were encoded
        again = request(f"{url}/v1/contexts/{a['id']}/append", {"text": second}, "POST")
        assert again[0] == 200 and again[1]["id"] == child["id"]  # content-addressed

        model = load_model(str(tiny), dtype=torch.float32, device="cpu")
        tok = model.tokenizer
        ma, mb = (model.compress(tok(t, add_special_tokens=False, return_tensors="pt").input_ids, window_batch_size=1)
                  for t in (first, second))
        ref = model.ask([ma, mb], QUESTION, mode="manual", max_new_tokens=16)
        appended = ask(url, child["id"], mode="manual", max_tokens=16)[1]
        status, both = request(url + "/v1/ask", {"context_ids": [a["id"], b["id"]], "question": QUESTION,
                                                 "mode": "manual", "max_tokens": 16}, "POST")
        assert status == 200 and both["answer"] == appended["answer"] == ref.answer, (both, appended, ref)
        assert both["slots"] == child["slots"] and both["context_ids"] == [a["id"], b["id"]]
        status, chat = request(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                               "context_ids": [a["id"], b["id"]], "mode": "manual", "max_tokens": 16}, "POST")
        assert status == 200 and chat["choices"][0]["message"]["content"] == ref.answer, chat

        # errors: 404 unknown, 413 past the limits, 422 both or neither of context_id(s)
        s, body = request(url + "/v1/ask", {"context_ids": [a["id"], "f" * 32], "question": QUESTION}, "POST")
        assert s == 404 and "f" * 32 in body["error"]["message"]
        s, body = request(url + "/v1/ask", {"context_ids": [a["id"]] * 4, "question": QUESTION}, "POST")
        assert s == 413 and "--max-contexts-per-question" in body["error"]["message"]
        s, body = request(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}],
                                                         "context_id": a["id"], "context_ids": [a["id"]]}, "POST")
        assert s == 422 and "context_ids" in body["error"]["message"]
        s, body = request(f"{url}/v1/contexts/{'0' * 32}/append", {"text": "more"}, "POST")
        assert s == 404
        s, body = request(f"{url}/v1/contexts/{a['id']}/append", {"text": "  "}, "POST")
        assert s == 422 and "empty" in body["error"]["message"]
        schema = request(url + "/openapi.json")[1]
        assert "/v1/contexts/{cid}/append" in schema["paths"] and "/v1/ask" in schema["paths"]

        # deleting the parent never breaks the child
        assert request(f"{url}/v1/contexts/{a['id']}", method="DELETE")[0] == 200
        assert ask(url, child["id"], mode="manual", max_tokens=16)[1]["answer"] == ref.answer

        # kill -9 in the middle of an append: the parent is intact, no half child; the append resumes
        big = request(f"{url}/v1/contexts/{b['id']}/append", {"text": text * 30}, "POST")[1]
        while request(f"{url}/v1/contexts/{big['id']}")[1]["progress"]["windows_done"] < 3:
            time.sleep(0.05)
        srv.kill9()
        assert not (store / f"{big['id']}.rcc").exists() and (store / f"{b['id']}.rcc").exists()
        srv = Server(tiny, store, "--window-batch-size", 8)
        assert ask(srv.url, b["id"], mode="manual", max_tokens=8)[0] == 200
        done = wait_ready(srv.url, big["id"])
        assert done["parent"] == b["id"] and done["slots"] > b["slots"]
        assert not list(store.glob(".*.part")) and not list(store.glob("*.txt"))
        assert sorted(p.stem for p in store.glob("*.rcc")) == sorted([b["id"], child["id"], big["id"]])
    finally:
        srv.stop()
