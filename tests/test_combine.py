"""Memories that grow and combine (RCCModel.compress(prefix=...) and RCCModel.combine):
equal to compressing the texts at once when they are whole windows, the cut kept and
recorded otherwise, refusals before any work, and the file format that carries them."""

import pytest
import torch

from rcc import CompressedContext, RCCError
from rcc.memory import read_memory_metadata
from rcc.vllm.slot_memory import combine_slots, compress_slots
from tests.conftest import tiny_rcc
from tests.test_memory import refused, rewrite


def ids(n, seed=0, vocab=300):
    return torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_rcc("llama", window=32, ratio=4, dtype=torch.float64)


def same_kv(x: CompressedContext, y: CompressedContext, atol=1e-10) -> bool:
    return x.num_slots == y.num_slots and all(
        torch.allclose(a, b, rtol=0, atol=atol) for p, q in zip(x.kv, y.kv) for a, b in zip(p, q))


def greedy(model, memory, prompt=None, n=8):
    prompt = ids(5, seed=99) if prompt is None else prompt
    return model.generate(memory, prompt, max_new_tokens=n, eos_token_id=None)[0].tolist()


def test_combining_whole_window_memories_equals_compressing_the_texts_at_once(model):
    a, b, c = ids(64, 1), ids(32, 2), ids(96, 3)  # 2, 1 and 3 windows of 32
    whole = model.compress(torch.cat([a, b, c], 1))
    parts = [model.compress(x) for x in (a, b, c)]
    combined = model.combine(parts)
    assert same_kv(combined, whole) and torch.allclose(combined.slots, whole.slots, rtol=0, atol=1e-10)
    assert (combined.num_tokens, combined.segments) == (192, (64, 32, 96))
    assert combined.parents == tuple(p.content_hash for p in parts)
    assert greedy(model, combined) == greedy(model, whole)
    # the order is the order given: B before A reads another context
    swapped = model.combine([parts[1], parts[0]])
    assert not same_kv(swapped, model.combine(parts[:2]), atol=1e-6)
    # model.ask over a list is ask over the combination (manual mode for memories)
    model.tokenizer = None
    with pytest.raises(RCCError, match="no tokenizer"):
        model.ask(parts, "q")


def test_append_keeps_the_cut_and_records_it(model):
    a, b = ids(64, 1), ids(32, 2)
    ma = model.compress(a)
    appended = model.compress(b, prefix=ma)
    assert same_kv(appended, model.compress(torch.cat([a, b], 1)))  # whole windows: exactly the text at once
    assert appended.segments == (64, 32) and appended.parents == (ma.content_hash,)
    assert torch.equal(appended.slots[:, : ma.num_slots], ma.slots)  # the parent's slots, unchanged
    # a partial window keeps its own cut: 40 + 20 tokens are 2 + 1 windows, not the 2 of 60 tokens at once
    short = model.compress(ids(20, 4), prefix=model.compress(ids(40, 5)))
    assert short.segments == (40, 20) and short.num_slots == 3 * 8
    assert model.compress(torch.cat([ids(40, 5), ids(20, 4)], 1)).num_slots == 2 * 8
    # and an append is a combination of the two memories
    assert same_kv(model.combine([model.compress(ids(40, 5)), model.compress(ids(20, 4))]), short)


def test_combine_refuses_what_it_cannot_read_before_any_work(model):
    ma = model.compress(ids(32, 1))
    bare = model.compress(ids(32, 2), keep_slots=False)
    assert bare.slots is None and model.combine([bare, ma]).num_slots == 16  # first: its KV cache is enough
    with pytest.raises(RCCError, match="memory 2 of 2 holds no slot inputs") as err:
        model.combine([ma, bare])
    assert "\n" not in str(err.value)
    other = tiny_rcc("llama", window=32, ratio=8, dtype=torch.float64)
    with pytest.raises(RCCError, match=r"memory 2 of 2: this memory was made by another model .*ratio 8"):
        model.combine([ma, other.compress(ids(32, 1))])
    with pytest.raises(RCCError, match="one or more"):
        model.combine([])
    limit = model.decoder.config.max_position_embeddings  # 256 positions: 32 windows of 8 slots
    many = [ma] * (limit // 8 + 1)
    with pytest.raises(RCCError, match=rf"hold {8 * len(many)} slots \(8 \+ 8 .*more than the {limit} positions"):
        model.combine(many)
    batch2 = model.compress(torch.cat([ids(32, 1), ids(32, 2)]))
    with pytest.raises(RCCError, match="one batch size"):
        model.combine([ma, batch2])


def test_the_file_keeps_slots_segments_and_parents(model, tmp_path):
    combined = model.combine([model.compress(ids(40, 1)), model.compress(ids(32, 2))])
    path = combined.save(tmp_path / "c.rcc")
    back = CompressedContext.load(path)
    assert (back.segments, back.parents) == (combined.segments, combined.parents)
    assert torch.equal(back.slots, combined.slots) and same_kv(back, combined, atol=0)
    meta = read_memory_metadata(path)
    assert meta["format"] == "rcc-memory/3" and meta["segments"] == "[40, 32]"
    bare = model.compress(ids(32, 2), keep_slots=False).save(tmp_path / "bare.rcc")
    assert CompressedContext.load(bare).slots is None
    assert bare.stat().st_size < path.stat().st_size / 2
    # segments that do not fit the slots, or parents that are not hashes, are refused (checksum rehashed)
    for key, value, words in [("segments", "[41, 32]", "does not fit"), ("segments", "[36, 36]", "does not fit"),
                              ("segments", "7", "not a JSON list"), ("parents", '["x"]', "not a list of content")]:
        bad = rewrite(path, tmp_path / f"{key}.rcc", lambda m, k=key, v=value: m.__setitem__(k, v), rehash=True)
        refused(bad, key, words)


def test_the_vllm_slots_combine_as_the_kv_memories_do(model):
    a, b = ids(64, 1), ids(32, 2)
    whole = compress_slots(model, torch.cat([a, b], 1))
    combined = combine_slots(model, [compress_slots(model, a), compress_slots(model, b)])
    assert torch.allclose(combined.slots, whole.slots, rtol=0, atol=1e-10) and combined.num_tokens == 96
    assert torch.allclose(combined.slots, model.compress(torch.cat([a, b], 1)).slots[0].to(combined.slots.dtype),
                          rtol=0, atol=1e-10)
    with pytest.raises(RCCError, match="another model"):
        combine_slots(model, [compress_slots(tiny_rcc("llama", window=32, ratio=4, seed=5, dtype=torch.float64), a)])
