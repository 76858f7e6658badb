"""Issue 12: every bad input, across the Python API and the ``hf-sinks`` CLI, gets a clear error before work starts.

Two tables: ``API_CASES`` (a call, the exception type, fragments its message must contain, usually the offending
value) and ``CLI_CASES`` (argv, fragments; the CLI must exit 2 with exactly one ``error:`` line, no traceback, and
for most cases before the model is even loaded). Then the out-of-step cache detection (a fault injected inside a
layer) and the cases that are legitimate but suspicious (warnings).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, random_ids, tiny_config, tiny_model

import hf_sinks
from hf_sinks import DuoCache, H2OCache, HeadPattern, RotaryParams, SinkCache, SinkConfig
from hf_sinks.cli import main
from hf_sinks.compat import cache_kwargs
from hf_sinks.validation import MAX_CACHE_TOKENS

WORDS = "the king is dead long live the queen of the north who would be king if the old man had not lost".split()


# ------------------------------------------------------------------------------------------------------ fixtures
class Context:
    """Lazily built models and files shared by the API cases (each built once per module)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, object] = {}

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def llama(self):  # 2 layers, 4 heads, 2 KV heads, head_dim 16, sink_sdpa
        return self._get("llama", lambda: tiny_model("llama"))

    @property
    def llama_sdpa(self):
        return self._get("llama_sdpa", lambda: tiny_model("llama", attn_implementation="sdpa"))

    @property
    def llama_4kv(self):
        return self._get("llama_4kv", lambda: tiny_model("llama", kv_heads=4))

    @property
    def h2o_model(self):
        return self._get("h2o", lambda: tiny_model("llama", attn_implementation="h2o_sdpa"))

    @property
    def duo_model(self):
        return self._get("duo", lambda: tiny_model("llama", attn_implementation="duo_sdpa"))

    @property
    def gpt2(self):
        def build():
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            config = GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
            )
            return GPT2LMHeadModel(config).eval()

        return self._get("gpt2", build)

    @property
    def gpt2_sink(self):
        def build():
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
            )
            return GPT2LMHeadModel._from_config(config, attn_implementation="sink_sdpa").eval()

        return self._get("gpt2_sink", build)

    @property
    def tokenizer(self):
        def build():
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            tok.train_from_iterator(
                [" ".join(WORDS)],
                trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<eos>"]),
            )
            return PreTrainedTokenizerFast(
                tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
            )

        return self._get("tokenizer", build)

    def file(self, name: str, content: bytes | str) -> str:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def missing(self, name: str) -> str:
        return str(self.root / "missing" / name)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(tmp_path_factory.mktemp("bad_inputs"))


def forward(model, cache, ids):
    return model(input_ids=ids, **cache_kwargs(cache), use_cache=True)


def _reuse_with_batch(model, cache, first, second):
    forward(model, cache, random_ids(first, 4))
    forward(model, cache, random_ids(second, 4 if second != 1 else 1))


def _past_capacity(model, cache):
    forward(model, cache, random_ids(1, 8))
    for i in range(6):
        forward(model, cache, random_ids(1, 1, seed=10 + i))


def _with_config_flag(model, value):
    model.config.attention_sinks = value
    try:
        return SinkConfig.from_model_config(model.config)
    finally:
        del model.config.attention_sinks


def _apply_with_flag(model, value):
    model.config.attention_sinks = value
    try:
        return hf_sinks.apply(model)
    finally:
        del model.config.attention_sinks


def _pattern_safetensors(ctx, name, tensors, metadata):
    from safetensors.torch import save_file

    path = ctx.root / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def _dynamic_llama_config():
    return tiny_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})


def _falcon_alibi():
    from transformers import FalconConfig

    return FalconConfig(alibi=True)


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config()


def _lazy(module, name):
    def call(*args, **kwargs):
        return getattr(__import__(module, fromlist=[name]), name)(*args, **kwargs)

    return call


streaming_perplexity = _lazy("hf_sinks.eval.perplexity", "streaming_perplexity")
make_passkey_prompt = _lazy("hf_sinks.eval.passkey", "make_passkey_prompt")
decode_benchmark = _lazy("hf_sinks.eval.bench", "decode_benchmark")
read_text = _lazy("hf_sinks.eval.data", "read_text")
load_token_ids = _lazy("hf_sinks.eval.data", "load_token_ids")
add_learned_sinks = _lazy("hf_sinks.training.learned_sinks", "add_learned_sinks")
AttentionSinkLogits = _lazy("hf_sinks.training.learned_sinks", "AttentionSinkLogits")
lora_recipe = _lazy("hf_sinks.training.recipes", "lora_recipe")
normalize_rope_scaling = _lazy("hf_sinks.training.rope_scaling", "normalize_rope_scaling")
PackedDataset = _lazy("hf_sinks.training.data", "PackedDataset")
split_token_ids = _lazy("hf_sinks.training.data", "split_token_ids")
prepend_sink_token = _lazy("hf_sinks.training.sink_token", "prepend_sink_token")
resize_for_sink_token = _lazy("hf_sinks.training.sink_token", "resize_for_sink_token")
analyze = _lazy("hf_sinks.analysis", "analyze")

TEN = torch.arange(1, 11)
BAD_IDS = torch.tensor([1, 2, 500, 3])


def case(name, call, exc, *fragments, absent=()):
    """One row: ``call(ctx)`` raises ``exc`` whose message contains every fragment and none of ``absent``."""
    return pytest.param(call, exc, fragments, absent, id=name)


# ------------------------------------------------------------------------------------------------- API matrix
API_CASES = [
    # SinkConfig
    case("config-sinks-negative", lambda c: SinkConfig(num_sink_tokens=-1), ValueError, "num_sink_tokens=-1", ">= 0"),
    case("config-sinks-bool", lambda c: SinkConfig(num_sink_tokens=True), TypeError, "num_sink_tokens=True"),
    case("config-window-float", lambda c: SinkConfig(window_length=2.5), TypeError, "window_length=2.5"),
    case("config-window-str", lambda c: SinkConfig(window_length="64"), TypeError, "window_length='64'"),
    case("config-window-zero", lambda c: SinkConfig(window_length=0), ValueError, "window_length=0", ">= 1"),
    case(
        "config-window-absurd",
        lambda c: SinkConfig(window_length=10**13),
        ValueError,
        "window_length=10000000000000",
        str(MAX_CACHE_TOKENS),
    ),
    case(
        "config-position-mode",
        lambda c: SinkConfig(position_mode="absolute"),
        ValueError,
        "position_mode='absolute'",
        "cache",
    ),
    case(
        "config-unknown-key",
        lambda c: SinkConfig.from_dict({"sink_size": 4}),
        ValueError,
        "'sink_size'",
        "allowed keys",
    ),
    case("config-from-list", lambda c: SinkConfig.from_dict([4, 1020]), TypeError, "[4, 1020]", "dict"),
    case(
        "config-json-missing",
        lambda c: SinkConfig.from_json_file(c.missing("sinks.json")),
        FileNotFoundError,
        "sinks.json",
    ),
    case(
        "config-json-truncated",
        lambda c: SinkConfig.from_json_file(c.file("trunc.json", '{"num_sink_tokens": 4')),
        ValueError,
        "trunc.json",
        "not valid JSON",
    ),
    case(
        "config-json-list",
        lambda c: SinkConfig.from_json_file(c.file("list.json", "[4, 1020]")),
        TypeError,
        "list.json",
        "[4, 1020]",
    ),
    case(
        "config-json-bad-value",
        lambda c: SinkConfig.from_json_file(c.file("neg.json", '{"window_length": -3}')),
        ValueError,
        "neg.json",
        "window_length=-3",
    ),
    case(
        "attention_sinks-truncated-json",
        lambda c: _with_config_flag(c.llama, '{"num_sink_tokens": 4'),
        ValueError,
        "attention_sinks",
        '{"num_sink_tokens": 4',
        "not valid JSON",
    ),
    case(
        "attention_sinks-list", lambda c: _with_config_flag(c.llama, [4, 1020]), TypeError, "attention_sinks=[4, 1020]"
    ),
    case("attention_sinks-int", lambda c: _with_config_flag(c.llama, 4), TypeError, "attention_sinks=4", "dict"),
    case("attention_sinks-json-list", lambda c: _with_config_flag(c.llama, "[1, 2]"), TypeError, "[1, 2]"),
    case(
        "attention_sinks-bad-window",
        lambda c: _with_config_flag(c.llama, {"window_length": -5}),
        ValueError,
        "attention_sinks",
        "window_length=-5",
    ),
    # SinkCache at construction
    case(
        "sinkcache-absurd-window",
        lambda c: SinkCache(4, 10**13),
        ValueError,
        "window_length=10000000000000",
        "too large",
    ),
    case("sinkcache-just-over-cap", lambda c: SinkCache(4, MAX_CACHE_TOKENS), ValueError, str(MAX_CACHE_TOKENS + 4)),
    case("sinkcache-negative-sinks", lambda c: SinkCache(-1, 8), ValueError, "num_sink_tokens=-1"),
    case("sinkcache-zero-window", lambda c: SinkCache(4, 0), ValueError, "window_length=0"),
    case("sinkcache-float-window", lambda c: SinkCache(4, 12.0), TypeError, "window_length=12.0"),
    case(
        "sinkcache-gpt2-config",
        lambda c: SinkCache(4, 12, config=_gpt2_config()),
        ValueError,
        "model_type='gpt2'",
        "RoPE",
    ),
    case(
        "sinkcache-alibi-falcon",
        lambda c: SinkCache(4, 12, config=_falcon_alibi()),
        ValueError,
        "alibi=True",
        "model_type='falcon'",
    ),
    case(
        "sinkcache-dict-config",
        lambda c: SinkCache(4, 12, config={"rope_theta": 1e4}),
        TypeError,
        "config={'rope_theta': 10000.0}",
        "PretrainedConfig",
    ),
    case(
        "sinkcache-model-as-config",
        lambda c: SinkCache(4, 12, config=c.llama),
        TypeError,
        "LlamaForCausalLM",
        "model.config",
    ),
    case(
        "sinkcache-dynamic-rope",
        lambda c: SinkCache(4, 12, config=_dynamic_llama_config()),
        ValueError,
        "rope_type='dynamic'",
    ),
    case("sinkcache-rotary-str", lambda c: SinkCache(4, 12, rotary="rope"), TypeError, "rotary='rope'", "RotaryParams"),
    case("sinkcache-from-config-str", lambda c: SinkCache.from_config("4+1020"), TypeError, "'4+1020'"),
    case("sinkcache-from-model-gpt2", lambda c: SinkCache.from_model(c.gpt2), ValueError, "GPT2LMHeadModel"),
    # SinkCache at the first update / on reuse
    case(
        "sinkcache-other-head-dim",
        lambda c: forward(c.llama, SinkCache(2, 4, config=tiny_config(head_dim=32)), random_ids(1, 6)),
        ValueError,
        "head_dim 32",
        "head_dim 16",
    ),
    case(
        "sinkcache-other-head-dim-stock",
        lambda c: forward(c.llama_sdpa, SinkCache(2, 4, config=tiny_config(head_dim=8)), random_ids(1, 6)),
        ValueError,
        "head_dim 8",
        "head_dim 16",
    ),
    case(
        "sinkcache-reuse-bigger-batch",
        lambda c: _reuse_with_batch(c.llama, SinkCache(2, 8), 1, 2),
        ValueError,
        "batch of 1",
        "batch size 2",
        "reset()",
    ),
    case(
        "sinkcache-reuse-smaller-batch-decode",
        lambda c: _reuse_with_batch(c.llama, SinkCache(2, 8), 2, 1),
        ValueError,
        "batch of 2",
        "batch size 1",
        "reset()",
    ),
    case(
        "sinkcache-reuse-stock-attention",
        lambda c: _reuse_with_batch(c.llama_sdpa, SinkCache(2, 8), 1, 3),
        ValueError,
        "batch of 1",
        "batch size 3",
    ),
    case(
        "sinkcache-reuse-other-model",
        lambda c: [
            forward(c.llama, cache := SinkCache(2, 8), random_ids(1, 3)),
            forward(c.llama_4kv, cache, random_ids(1, 3)),
        ],
        ValueError,
        "2 KV head(s)",
        "4 x 16",
        "reset()",
    ),
    case(
        "sinkcache-gpt2-past-capacity",
        lambda c: _past_capacity(c.gpt2, SinkCache(2, 4)),
        ValueError,
        "rotary",
        "GPT-2",
        absent=("config=model.config",),
    ),
    case(
        "sinkcache-gpt2-sink-attention",
        lambda c: forward(c.gpt2_sink, SinkCache(2, 4), random_ids(1, 3)),
        ValueError,
        "model_type='gpt2'",
    ),
    # RotaryParams
    case(
        "rotary-from-gpt2-config", lambda c: RotaryParams.from_config(_gpt2_config()), ValueError, "model_type='gpt2'"
    ),
    case("rotary-from-gpt2-model", lambda c: RotaryParams.from_model(c.gpt2), ValueError, "GPT2LMHeadModel", "rotary"),
    case("rotary-from-dict", lambda c: RotaryParams.from_config({"rope_theta": 1.0}), TypeError, "dict"),
    # H2OCache
    case("h2o-negative-sinks", lambda c: H2OCache(-1), ValueError, "num_sink_tokens=-1"),
    case("h2o-zero-window", lambda c: H2OCache(4, 0), ValueError, "window_length=0"),
    case("h2o-negative-heavy", lambda c: H2OCache(4, 8, -1), ValueError, "heavy_budget=-1"),
    case("h2o-float-heavy", lambda c: H2OCache(4, 8, 2.5), TypeError, "heavy_budget=2.5"),
    case("h2o-positions", lambda c: H2OCache(positions="relative"), ValueError, "positions='relative'", "original"),
    case("h2o-absurd-budget", lambda c: H2OCache(4, 10**9, 10**9), ValueError, "heavy_budget=1000000000", "too large"),
    case("h2o-rotary-int", lambda c: H2OCache(rotary=1), TypeError, "rotary=1"),
    case(
        "h2o-reuse-batch",
        lambda c: _reuse_with_batch(c.h2o_model, H2OCache(2, 4, 2), 1, 2),
        ValueError,
        "batch of 1",
        "batch size 2",
        "reset()",
    ),
    case(
        "h2o-perplexity-heavy",
        lambda c: streaming_perplexity(c.llama_sdpa, TEN, progress=False, cache=H2OCache(2, 4, -1)),
        ValueError,
        "heavy_budget=-1",
    ),
    case(
        "h2o-perplexity-ids",
        lambda c: streaming_perplexity(c.llama_sdpa, BAD_IDS, progress=False, cache=H2OCache(2, 4, 2)),
        ValueError,
        "token id 500",
        f"{VOCAB} tokens",
    ),
    # DuoCache / HeadPattern
    case(
        "duo-tensor-pattern", lambda c: DuoCache(torch.ones(2, 2, dtype=torch.bool)), TypeError, "Tensor", "HeadPattern"
    ),
    case(
        "duo-negative-sinks",
        lambda c: DuoCache(HeadPattern.full(c.duo_model.config), -1),
        ValueError,
        "num_sink_tokens=-1",
    ),
    case(
        "duo-zero-window", lambda c: DuoCache(HeadPattern.full(c.duo_model.config), 4, 0), ValueError, "window_length=0"
    ),
    case(
        "duo-pattern-more-layers",
        lambda c: forward(
            c.duo_model, DuoCache(HeadPattern(torch.ones(5, 2, dtype=torch.bool)), 2, 4), random_ids(1, 4)
        ),
        ValueError,
        "(5, 2)",
        "2 layers",
    ),
    case(
        "duo-pattern-fewer-layers",
        lambda c: forward(
            c.duo_model, DuoCache(HeadPattern(torch.ones(1, 2, dtype=torch.bool)), 2, 4), random_ids(1, 4)
        ),
        ValueError,
        "(1, 2)",
        "2 layers",
    ),
    case(
        "duo-pattern-more-heads",
        lambda c: forward(
            c.duo_model, DuoCache(HeadPattern(torch.ones(2, 3, dtype=torch.bool)), 2, 4), random_ids(1, 4)
        ),
        ValueError,
        "2 KV heads",
        "3",
    ),
    case(
        "duo-config-mismatch",
        lambda c: DuoCache(HeadPattern(torch.ones(2, 4, dtype=torch.bool)), 2, 4, config=c.duo_model.config),
        ValueError,
        "(2, 4)",
        "2 layers x 2 KV heads",
    ),
    case(
        "duo-reuse-batch",
        lambda c: _reuse_with_batch(c.duo_model, DuoCache(HeadPattern.full(c.duo_model.config), 2, 4), 1, 2),
        ValueError,
        "batch of 1",
        "batch size 2",
    ),
    case(
        "pattern-corrupted-safetensors",
        lambda c: HeadPattern.load(c.file("bad.safetensors", b"\x00garbage" * 10)),
        ValueError,
        "bad.safetensors",
    ),
    case(
        "pattern-truncated-safetensors",
        lambda c: HeadPattern.load(
            c.file(
                "cut.safetensors",
                Path(HeadPattern.full(tiny_config()).save(c.root / "full.safetensors")).read_bytes()[:40],
            )
        ),
        ValueError,
        "cut.safetensors",
    ),
    case(
        "pattern-safetensors-no-retrieval",
        lambda c: HeadPattern.load(
            _pattern_safetensors(
                c, "noret.safetensors", {"other": torch.ones(2, 2)}, {"format": "hf_sinks.HeadPattern"}
            )
        ),
        ValueError,
        "noret.safetensors",
        "'retrieval'",
    ),
    case(
        "pattern-safetensors-other-format",
        lambda c: HeadPattern.load(
            _pattern_safetensors(
                c, "other.safetensors", {"retrieval": torch.ones(2, 2, dtype=torch.uint8)}, {"format": "something"}
            )
        ),
        ValueError,
        "other.safetensors",
        "'something'",
    ),
    case(
        "pattern-ragged-json",
        lambda c: HeadPattern.load(
            c.file("ragged.json", json.dumps({"format": "hf_sinks.HeadPattern", "retrieval": [[1, 0], [1]]}))
        ),
        ValueError,
        "ragged.json",
        "ragged",
        "row 1",
    ),
    case(
        "pattern-truncated-json",
        lambda c: HeadPattern.load(c.file("cut.json", '{"format": "hf_sinks.HeadPattern", "re')),
        ValueError,
        "cut.json",
        "not valid JSON",
    ),
    case(
        "pattern-json-other-format",
        lambda c: HeadPattern.load(c.file("x.json", '{"retrieval": [[1]]}')),
        ValueError,
        "x.json",
        "Not a saved HeadPattern",
    ),
    case(
        "pattern-json-strings",
        lambda c: HeadPattern.load(
            c.file("str.json", json.dumps({"format": "hf_sinks.HeadPattern", "retrieval": [["a", "b"]]}))
        ),
        ValueError,
        "str.json",
        "retrieval",
    ),
    case(
        "pattern-binary-json",
        lambda c: HeadPattern.load(c.file("bin.json", b"\xff\xfe\x00\x01")),
        ValueError,
        "bin.json",
    ),
    case("pattern-missing", lambda c: HeadPattern.load(c.missing("pattern.json")), FileNotFoundError, "pattern.json"),
    case("pattern-npy", lambda c: HeadPattern.load(c.missing("pattern.npy")), ValueError, "'.npy'"),
    case(
        "pattern-load-mismatch",
        lambda c: HeadPattern.load(
            HeadPattern(torch.ones(3, 2, dtype=torch.bool)).save(c.root / "three.json"), config=c.duo_model.config
        ),
        ValueError,
        "three.json",
        "(3, 2)",
        "2 layers x 2 KV heads",
    ),
    case("pattern-value-2", lambda c: HeadPattern(torch.tensor([[1, 2]])), ValueError, "retrieval[0, 1] = 2"),
    case(
        "pattern-scores-nan",
        lambda c: HeadPattern(torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0.5, math.nan]])),
        ValueError,
        "scores[0, 1] = nan",
    ),
    case(
        "pattern-sparsity",
        lambda c: HeadPattern.from_scores(torch.ones(2, 2), sparsity=1.5),
        ValueError,
        "sparsity=1.5",
    ),
    case(
        "pattern-sparsity-and-threshold",
        lambda c: HeadPattern.from_scores(torch.ones(2, 2), sparsity=0.5, threshold=0.5),
        ValueError,
        "sparsity=0.5",
        "threshold=0.5",
    ),
    case(
        "pattern-duo-attention-missing",
        lambda c: HeadPattern.from_duo_attention(c.missing("full_attention_heads.tsv")),
        FileNotFoundError,
        "full_attention_heads.tsv",
    ),
    # apply / AutoModelForCausalLM
    case("apply-gpt2", lambda c: hf_sinks.apply(c.gpt2), ValueError, "model_type='gpt2'", "no RoPE"),
    case(
        "apply-stock-attention",
        lambda c: hf_sinks.apply(tiny_model("llama"), attn_implementation="sdpa"),
        ValueError,
        "'sdpa'",
        "sink_sdpa",
    ),
    case(
        "apply-negative-sinks",
        lambda c: hf_sinks.apply(tiny_model("llama"), num_sink_tokens=-1),
        ValueError,
        "num_sink_tokens=-1",
    ),
    case(
        "apply-str-window",
        lambda c: hf_sinks.apply(tiny_model("llama"), window_length="1k"),
        TypeError,
        "window_length='1k'",
    ),
    case(
        "apply-truncated-flag",
        lambda c: _apply_with_flag(tiny_model("llama"), '{"window_length": 8'),
        ValueError,
        '{"window_length": 8',
    ),
    case(
        "auto-negative-sink-size",
        lambda c: hf_sinks.AutoModelForCausalLM.from_config(tiny_config(), attention_sink_size=-2),
        ValueError,
        "num_sink_tokens=-2",
    ),
    case(
        "auto-conflicting-sizes",
        lambda c: hf_sinks.AutoModelForCausalLM.from_config(tiny_config(), num_sink_tokens=4, attention_sink_size=2),
        ValueError,
        "num_sink_tokens=4",
        "attention_sink_size=2",
    ),
    case(
        "auto-stock-attention",
        lambda c: hf_sinks.AutoModelForCausalLM.from_config(tiny_config(), sink_attn_implementation="sdpa"),
        ValueError,
        "sink_attn_implementation='sdpa'",
    ),
    # training
    case("learned-sinks-gpt2", lambda c: add_learned_sinks(c.gpt2), ValueError, "model_type='gpt2'", "no RoPE"),
    case(
        "learned-sinks-nan-init",
        lambda c: add_learned_sinks(tiny_model("llama"), init_value=math.nan),
        ValueError,
        "init_value=nan",
    ),
    case("learned-sinks-zero-heads", lambda c: AttentionSinkLogits(0), ValueError, "num_heads=0"),
    case("lora-recipe-gpt2", lambda c: lora_recipe(c.gpt2, "sinklora"), ValueError, "model_type='gpt2'"),
    case(
        "lora-recipe-unknown",
        lambda c: lora_recipe(tiny_model("llama", attn_implementation="sdpa"), "qlora"),
        ValueError,
        "'qlora'",
    ),
    case(
        "rope-scaling-type", lambda c: normalize_rope_scaling({"rope_type": "ntk", "factor": 2.0}), ValueError, "'ntk'"
    ),
    case(
        "rope-scaling-factor",
        lambda c: normalize_rope_scaling({"rope_type": "linear", "factor": 0}),
        ValueError,
        "factor",
        "0",
    ),
    case(
        "rope-scaling-inf",
        lambda c: normalize_rope_scaling({"rope_type": "linear", "factor": math.inf}),
        ValueError,
        "inf",
    ),
    case("packed-seq-len", lambda c: PackedDataset(TEN, seq_len=1), ValueError, "seq_len=1"),
    case("split-held-out", lambda c: split_token_ids(TEN, 10), ValueError, "held_out=10"),
    case(
        "prepend-sink-3d",
        lambda c: prepend_sink_token(torch.ones(1, 2, 3, dtype=torch.long), 5),
        ValueError,
        "(1, 2, 3)",
    ),
    case(
        "resize-init-from",
        lambda c: resize_for_sink_token(tiny_model("llama"), VOCAB, init_from=10**6),
        ValueError,
        "init_from=1000000",
    ),
    # evaluation
    case(
        "ppl-id-above-vocab",
        lambda c: streaming_perplexity(c.llama, BAD_IDS, progress=False),
        ValueError,
        "token id 500",
        f"{VOCAB} tokens",
    ),
    case(
        "ppl-id-equal-vocab",
        lambda c: streaming_perplexity(c.llama, torch.tensor([1, VOCAB, 2]), mode="dense", progress=False),
        ValueError,
        f"token id {VOCAB}",
    ),
    case(
        "ppl-negative-id",
        lambda c: streaming_perplexity(c.llama, torch.tensor([1, -1, 2]), progress=False),
        ValueError,
        "token id -1",
    ),
    case(
        "ppl-recompute-bad-id",
        lambda c: streaming_perplexity(c.llama, BAD_IDS, mode="recompute", progress=False),
        ValueError,
        "token id 500",
    ),
    case(
        "ppl-mode",
        lambda c: streaming_perplexity(c.llama, TEN, mode="banana", progress=False),
        ValueError,
        "mode='banana'",
        "recompute",
    ),
    case(
        "ppl-chunk-zero",
        lambda c: streaming_perplexity(c.llama, TEN, chunk_size=0, progress=False),
        ValueError,
        "chunk_size=0",
    ),
    case(
        "ppl-window-bool",
        lambda c: streaming_perplexity(c.llama, TEN, window_length=True, progress=False),
        TypeError,
        "window_length=True",
    ),
    case(
        "ppl-batch",
        lambda c: streaming_perplexity(c.llama, random_ids(2, 5), progress=False),
        ValueError,
        "batch size 2",
    ),
    case(
        "ppl-one-token",
        lambda c: streaming_perplexity(c.llama, torch.tensor([3]), progress=False),
        ValueError,
        "1 token",
    ),
    case(
        "ppl-float-ids", lambda c: streaming_perplexity(c.llama, torch.rand(5), progress=False), ValueError, "float32"
    ),
    case(
        "cache-ppl-with-mode",
        lambda c: streaming_perplexity(c.llama, TEN, "sink", progress=False, cache=SinkCache(2, 4)),
        ValueError,
        "mode='sink'",
        "cache=",
    ),
    case(
        "cache-ppl-not-a-cache",
        lambda c: streaming_perplexity(c.llama, TEN, progress=False, cache={"k": 1}),
        TypeError,
        "transformers Cache",
        "dict",
    ),
    case(
        "ppl-attention-without-cache",
        lambda c: streaming_perplexity(c.llama, TEN, attn_implementation="sdpa", progress=False),
        ValueError,
        "cache=",
    ),
    case(
        "cache-ppl-bad-id",
        lambda c: streaming_perplexity(c.llama, BAD_IDS, progress=False, cache=SinkCache(2, 4)),
        ValueError,
        "token id 500",
    ),
    case("passkey-depth", lambda c: make_passkey_prompt(c.tokenizer, 64, 1.5, "123"), ValueError, "depth=1.5"),
    case("passkey-key", lambda c: make_passkey_prompt(c.tokenizer, 64, 0.5, "abc"), ValueError, "key='abc'"),
    case("passkey-length", lambda c: make_passkey_prompt(c.tokenizer, 0, 0.5, "123"), ValueError, "context_length=0"),
    case(
        "bench-mode",
        lambda c: decode_benchmark(c.llama, TEN, lengths=[4], modes=["nope"], progress=False),
        ValueError,
        "nope",
    ),
    case(
        "bench-lengths", lambda c: decode_benchmark(c.llama, TEN, lengths=[0, 4], progress=False), ValueError, "[0, 4]"
    ),
    case(
        "bench-steps",
        lambda c: decode_benchmark(c.llama, TEN, lengths=[4], steps=0, progress=False),
        ValueError,
        "steps=0",
    ),
    case(
        "analyze-epsilon", lambda c: analyze(c.llama_sdpa, TEN, epsilon=1.5, progress=False), ValueError, "epsilon=1.5"
    ),
    case(
        "analyze-bad-id",
        lambda c: analyze(c.llama_sdpa, BAD_IDS, num_tokens=None, progress=False),
        ValueError,
        "token id 500",
    ),
    case(
        "text-binary",
        lambda c: read_text(c.file("image.bin", bytes(range(256)) * 8)),
        ValueError,
        "image.bin",
        "binary",
    ),
    case(
        "text-utf16",
        lambda c: read_text(c.file("utf16.txt", "the king is dead".encode("utf-16"))),
        ValueError,
        "utf16.txt",
        "NUL",
    ),
    case(
        "text-mostly-invalid",
        lambda c: read_text(c.file("latin.txt", b"\xe9t\xe9 " * 400)),
        ValueError,
        "latin.txt",
        "undecodable",
    ),
    case("text-empty", lambda c: read_text(c.file("empty.txt", "  \n")), ValueError, "empty.txt", "empty"),
    case("text-missing", lambda c: read_text(c.missing("nope.txt")), FileNotFoundError, "nope.txt"),
    case("text-directory", lambda c: read_text(str(c.root)), FileNotFoundError, "directory"),
    case(
        "text-too-short",
        lambda c: load_token_ids(c.tokenizer, c.file("short.txt", "the king is dead"), 10**6),
        ValueError,
        "num_tokens=1000000",
    ),
]


@pytest.mark.parametrize("call, exc, fragments, absent", API_CASES)
def test_api_bad_input(ctx, call, exc, fragments, absent):
    with pytest.raises(exc) as info:
        call(ctx)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    for fragment in absent:
        assert fragment not in message, f"{fragment!r} should not be in {message!r}"
    assert "\n" not in message.strip() or len(message) < 2000


# ------------------------------------------------------------------------------------------------- CLI matrix
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny Llama + word-level tokenizer saved as a local HF model, a text, and assorted bad files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli_bad_inputs")
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (400,), generator=gen).tolist()
    text = root / "words.txt"
    text.write_text("\n".join(" ".join(WORDS[i] for i in picks[k : k + 10]) for k in range(0, 400, 10)) + "\n")
    model_dir = root / "model"
    tiny_model("llama", layers=2).save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [text.read_text()], trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<eos>"])
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(model_dir)
    files = {
        "model": model_dir,
        "text": text,
        "file": root / "regular_file",
        "binary": root / "image.bin",
        "empty": root / "empty.txt",
        "broken_json": root / "broken.json",
        "ragged_json": root / "ragged.json",
        "corrupt_st": root / "corrupt.safetensors",
        "wrong_shape": root / "wrong_shape.json",
        "tmp": root,
        "notgguf": root / "weights.bin",
    }
    files["file"].write_text("I am a file, not a directory\n")
    files["binary"].write_bytes(bytes(range(256)) * 16)
    files["empty"].write_text("")
    files["broken_json"].write_text('{"format": "hf_sinks.HeadPattern", "retrieval": [[1, 0], [0')
    files["ragged_json"].write_text(json.dumps({"format": "hf_sinks.HeadPattern", "retrieval": [[1, 0], [1]]}))
    files["corrupt_st"].write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{broken")
    HeadPattern(torch.ones(3, 2, dtype=torch.bool)).save(files["wrong_shape"])
    files["notgguf"].write_bytes(b"\x00" * 16)
    return {k: str(v) for k, v in files.items()}


def cli(name, argv, *fragments, early=True):
    """One row: ``hf-sinks argv`` exits 2 with one error line containing the fragments; ``early``: before loading."""
    return pytest.param(argv, fragments, early, id=f"cli-{name}")


PPL = "perplexity --model {model} --text-file {text} --num-tokens 40 --no-progress --no-plot --output-dir {tmp}/ppl"
GEN = "generate --model {model} --prompt hello --max-new-tokens 2"
BENCH = "bench --model {model} --text-file {text} --lengths 8 --steps 1 --no-progress --no-plot --output-dir {tmp}/b"
PASSKEY = "passkey --model {model} --lengths 32 --trials 1 --no-progress --no-plot --output-dir {tmp}/pk"
ANALYZE = "analyze --model {model} --text-file {text} --num-tokens 32 --no-progress --no-plot --output-dir {tmp}/an"
TRAIN = (
    "train --model {model} --text-file {text} --max-steps 1 --seq-len 16 --no-progress --no-plot --output-dir {tmp}/tr"
)

CLI_CASES = [
    # perplexity
    cli("ppl-threads-negative", PPL + " --threads -1", "--threads=-1", ">= 1"),
    cli("ppl-threads-zero", PPL + " --threads 0", "--threads=0"),
    cli("ppl-device-bogus", PPL + " --device bogus", "--device='bogus'", "cpu"),
    cli("ppl-device-index", PPL + " --device cuda:99", "--device='cuda:99'"),
    cli("ppl-attn-bogus", PPL + " --attn-implementation flash_bogus", "'flash_bogus'", "sink_sdpa"),
    cli("ppl-outdir-under-file", PPL + " --output-dir {file}/out", "{file}", "regular file"),
    cli("ppl-outdir-is-file", PPL + " --output-dir {file}", "{file}", "regular file"),
    cli("ppl-outdir-unwritable", PPL + " --output-dir /proc/hf_sinks_out", "/proc/hf_sinks_out", "not writable"),
    cli("ppl-text-binary", PPL + " --text-file {binary}", "image.bin", "binary"),
    cli("ppl-text-empty", PPL + " --text-file {empty}", "empty.txt", "empty"),
    cli("ppl-text-directory", PPL + " --text-file {tmp}", "{tmp}", "does not exist"),
    cli("ppl-text-missing", PPL + " --text-file {tmp}/nope.txt", "nope.txt"),
    cli("ppl-num-tokens", PPL + " --num-tokens 1", "--num-tokens=1"),
    cli("ppl-num-tokens-too-many", PPL + " --num-tokens 100000", "num_tokens=100000", early=False),
    cli("ppl-csv-every", PPL + " --csv-every 0", "--csv-every=0"),
    cli("ppl-smooth", PPL + " --smooth -5", "--smooth=-5"),
    cli("ppl-window-text", PPL + " --window-length abc", "'abc'"),
    cli("ppl-window-zero", PPL + " --window-length 8,0", "--window-length=0"),
    cli("ppl-modes-bogus", PPL + " --modes dense,bogus", "'bogus'", "recompute"),
    cli("ppl-chunk", PPL + " --chunk-size -1", "--chunk-size=-1"),
    cli("ppl-sinks", PPL + " --num-sink-tokens -1", "--num-sink-tokens=-1"),
    cli("ppl-model-missing", PPL + " --model {tmp}/no_model", "no_model"),
    cli("ppl-model-not-gguf", PPL + " --model {notgguf}", "weights.bin", ".gguf"),
    # generate / chat
    cli("gen-temperature", GEN + " --temperature -1", "--temperature=-1.0"),
    cli("gen-temperature-nan", GEN + " --temperature nan", "--temperature=nan"),
    cli("gen-top-p-zero", GEN + " --top-p 0", "--top-p=0.0"),
    cli("gen-top-p-big", GEN + " --top-p 1.5", "--top-p=1.5"),
    cli("gen-max-new-tokens", GEN + " --max-new-tokens 0", "--max-new-tokens=0"),
    cli("gen-threads", GEN + " --threads -2", "--threads=-2"),
    cli("gen-device", GEN + " --device tpu9", "--device='tpu9'"),
    cli("chat-window", "chat --model {model} --window-length 0", "--window-length=0"),
    # bench
    cli("bench-outdir-under-file", BENCH + " --output-dir {file}/bench", "{file}", "regular file"),
    cli("bench-warmup", BENCH + " --warmup -1", "--warmup=-1"),
    cli("bench-prefill", BENCH + " --prefill-chunk 0", "--prefill-chunk=0"),
    cli("bench-recompute-steps", BENCH + " --recompute-steps 0", "--recompute-steps=0"),
    cli("bench-lengths", BENCH + " --lengths 8,x", "'8,x'"),
    cli("bench-rounds", BENCH + " --rounds 0", "--rounds=0"),
    cli("bench-threads", BENCH + " --threads -1", "--threads=-1"),
    cli("bench-text-binary", BENCH + " --text-file {binary}", "image.bin"),
    # passkey
    cli("passkey-broken-json", PASSKEY + " --modes duo --pattern {broken_json}", "broken.json", "not valid JSON"),
    cli("passkey-ragged-json", PASSKEY + " --modes duo --pattern {ragged_json}", "ragged.json", "ragged"),
    cli("passkey-corrupt-safetensors", PASSKEY + " --modes duo --pattern {corrupt_st}", "corrupt.safetensors"),
    cli(
        "passkey-pattern-shape",
        PASSKEY + " --modes duo --pattern {wrong_shape}",
        "wrong_shape.json",
        "(3, 2)",
        early=False,
    ),
    cli("passkey-max-new-tokens", PASSKEY + " --max-new-tokens 0", "--max-new-tokens=0"),
    cli("passkey-chunk", PASSKEY + " --chunk-size 0", "--chunk-size=0"),
    cli("passkey-heavy", PASSKEY + " --modes h2o --heavy-budget -1", "--heavy-budget", "-1"),
    cli("passkey-depths", PASSKEY + " --depths a,b", "'a,b'"),
    cli("passkey-outdir", PASSKEY + " --output-dir {file}/pk", "{file}"),
    cli("passkey-device", PASSKEY + " --device bogus", "--device='bogus'"),
    # analyze
    cli("analyze-epsilon", ANALYZE + " --epsilon 2", "--epsilon=2.0"),
    cli("analyze-sink-tokens", ANALYZE + " --sink-tokens 0", "--sink-tokens=0"),
    cli("analyze-secondary-factor", ANALYZE + " --secondary-factor 1", "--secondary-factor=1.0"),
    cli("analyze-min-distance", ANALYZE + " --min-distance 0", "--min-distance=0"),
    cli("analyze-secondary-min-heads", ANALYZE + " --secondary-min-heads 0", "--secondary-min-heads=0"),
    cli("analyze-outdir", ANALYZE + " --output-dir {file}/an", "{file}"),
    cli("analyze-threads", ANALYZE + " --threads -1", "--threads=-1"),
    cli("analyze-text-binary", ANALYZE + " --text-file {binary}", "image.bin"),
    # train
    cli("train-r", TRAIN + " --r 0", "--r=0"),
    cli("train-seq-len", TRAIN + " --seq-len 1", "--seq-len=1"),
    cli("train-max-steps", TRAIN + " --max-steps 0", "--max-steps=0"),
    cli("train-learning-rate", TRAIN + " --learning-rate -0.1", "--learning-rate=-0.1"),
    cli("train-lora-dropout", TRAIN + " --lora-dropout 1.5", "--lora-dropout=1.5"),
    cli("train-held-out", TRAIN + " --held-out-tokens -1", "--held-out-tokens=-1"),
    cli("train-batch", TRAIN + " --batch-size 0", "--per-device-train-batch-size=0"),
    cli("train-accumulation", TRAIN + " --gradient-accumulation-steps 0", "--gradient-accumulation-steps=0"),
    cli("train-window", TRAIN + " --window-length 0", "--window-length=0"),
    cli("train-sinks", TRAIN + " --num-sink-tokens -1", "--num-sink-tokens=-1"),
    cli("train-rope-factor", TRAIN + " --rope-scaling-type linear --rope-scaling-factor 0", "factor", "0"),
    cli("train-rope-factor-only-type", TRAIN + " --rope-scaling-type linear", "--rope-scaling-factor"),
    cli("train-outdir", TRAIN + " --output-dir {file}/tr", "{file}"),
    cli("train-threads", TRAIN + " --threads -1", "--threads=-1"),
    cli("train-attn", TRAIN + " --attn-implementation bogus_attn", "'bogus_attn'"),
    cli("train-text-missing", TRAIN + " --text-file {tmp}/nope.txt", "nope.txt"),
    cli("train-text-binary", TRAIN + " --text-file {binary}", "image.bin"),
]


@pytest.mark.parametrize("argv, fragments, early", CLI_CASES)
def test_cli_bad_input(cli_files, capsys, argv, fragments, early):
    if "cuda" in argv and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("a machine with 100 GPUs")
    args = argv.format(**cli_files).split()
    code = main(args)
    captured = capsys.readouterr()
    err = captured.err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith(f"hf-sinks {args[0]}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        fragment = fragment.format(**cli_files)
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    if early:
        assert "loading model" not in err, f"the error came after the model loaded: {err}"


def test_matrix_size():
    """The issue asks for at least 100 bad inputs across the API and the CLI."""
    assert len(API_CASES) + len(CLI_CASES) >= 100
    assert len({p.id for p in API_CASES + CLI_CASES}) == len(API_CASES) + len(CLI_CASES)


def test_bench_output_dir_fails_before_the_benchmark(cli_files, capsys, monkeypatch):
    def no_benchmark(*args, **kwargs):
        raise AssertionError("the benchmark ran before --output-dir was checked")

    monkeypatch.setattr("hf_sinks.eval.bench.decode_benchmark", no_benchmark)
    assert main(BENCH.format(**cli_files).split() + ["--output-dir", cli_files["file"] + "/bench"]) == 2
    err = capsys.readouterr().err
    assert "regular file" in err and "loading model" not in err


def test_text_with_a_few_bad_bytes_warns_once_and_runs(cli_files, tmp_path, capsys):
    text = Path(cli_files["text"]).read_bytes()
    dirty = tmp_path / "dirty.txt"
    dirty.write_bytes(text[:200] + b"\xff" + text[200:])
    assert (
        main(
            PPL.format(**cli_files).split()
            + [
                "--text-file",
                str(dirty),
                "--modes",
                "sink",
                "--window-length",
                "8",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if ": warning: " in line and "dirty.txt" in line]
    assert len(warnings_) == 1 and "1 byte sequence(s)" in warnings_[0] and "U+FFFD" in warnings_[0], warnings_


def test_cli_process_prints_one_line_and_exits_2(cli_files):
    """The real entry point (a process): exit status 2, one stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sinks.cli", "perplexity", "--threads", "-1", "--model", cli_files["model"]],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        "hf-sinks perplexity: error: --threads=-1 is invalid: must be an int >= 1; omit it for torch's default."
    ], proc.stderr


# ------------------------------------------------------------------------------------------ out-of-step caches
def _fault_once(model, layer: int):
    """A forward hook on decoder layer ``layer`` that raises once (the layer has already updated the cache)."""
    state = {"armed": True}

    def hook(module, args, output):
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("injected fault")

    return model.model.layers[layer].register_forward_hook(hook)


def _sink_setup():
    model = tiny_model("llama", layers=3)
    hf_sinks.apply(model, num_sink_tokens=2, window_length=6)
    return model, lambda: SinkCache.from_model(model)


def _stock_sink_setup():
    model = tiny_model("llama", layers=3, attn_implementation="sdpa")
    return model, lambda: SinkCache(2, 6, config=model.config)


def _h2o_setup():
    model = tiny_model("llama", layers=3, attn_implementation="h2o_sdpa")
    return model, lambda: H2OCache(2, 4, 2)


def _duo_setup():
    model = tiny_model("llama", layers=3, attn_implementation="duo_sdpa")
    pattern = HeadPattern(torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=torch.bool))
    return model, lambda: DuoCache(pattern, 2, 4)


SETUPS = {"sink": _sink_setup, "sink-stock-attention": _stock_sink_setup, "h2o": _h2o_setup, "duo": _duo_setup}


@pytest.mark.parametrize("kind", list(SETUPS))
@pytest.mark.parametrize("faulty_layer", [0, 1])
@pytest.mark.parametrize("warm", [False, True], ids=["first-forward", "later-forward"])
def test_retry_after_a_fault_inside_a_layer_is_refused(kind, faulty_layer, warm):
    model, make_cache = SETUPS[kind]()
    cache = make_cache()
    ids = random_ids(1, 14, seed=3)
    if warm:
        forward(model, cache, ids[:, :5])
    handle = _fault_once(model, faulty_layer)
    with pytest.raises(RuntimeError, match="injected fault"):
        forward(model, cache, ids[:, 5:9])
    handle.remove()
    with pytest.raises(RuntimeError, match=r"out of step.*layer \d has seen \d+ token.*reset\(\)") as info:
        forward(model, cache, ids[:, 5:9])  # the retry a user would make
    assert type(cache).__name__ in str(info.value)
    # reset() is the way out: the cache then gives exactly what a fresh cache gives
    cache.reset()
    got = forward(model, cache, ids[:, :9]).logits
    want = forward(model, make_cache(), ids[:, :9]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_retry_after_a_fault_is_refused():
    model, make_cache = _sink_setup()
    cache = make_cache()
    forward(model, cache, random_ids(1, 10))
    handle = _fault_once(model, 1)
    with pytest.raises(RuntimeError, match="injected fault"):
        forward(model, cache, random_ids(1, 1, seed=5))
    handle.remove()
    with pytest.raises(RuntimeError, match=r"layer 0 has seen 11 token\(s\) but layer 2 has seen 10"):
        forward(model, cache, random_ids(1, 1, seed=5))


def _hooked_forward(model, cache, ids):
    """What the position hook of ``hf_sinks.apply`` does before the layers run, then the forward."""
    positions = cache.begin_forward(ids.shape[0], ids.shape[1], None, ids.device)
    return model(input_ids=ids, position_ids=positions, **cache_kwargs(cache), use_cache=True)


def test_a_forward_that_fails_before_any_layer_leaves_the_sink_cache_usable():
    """A forward can fail after the position hook announced it but before any layer stored a token (e.g. a token id
    past the vocabulary, in the embedding): the cache rolls the hook's counters back (and un-does a re-basing of the
    positions), so the stream continues exactly."""
    model, make_cache = _sink_setup()
    cache, reference = make_cache(), make_cache()
    ids = random_ids(1, 60, seed=4)
    rebased_in_a_failed_forward = False
    for begin in range(0, 60, 4):
        if begin in (12, 16, 40):  # 16 and 40 also move the position base
            with pytest.raises(IndexError):
                _hooked_forward(model, cache, torch.tensor([[1, 10**6, 2, 3]]))
            rebased_in_a_failed_forward |= cache._announced[2] is not None
        got = _hooked_forward(model, cache, ids[:, begin : begin + 4]).logits
        want = _hooked_forward(model, reference, ids[:, begin : begin + 4]).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert rebased_in_a_failed_forward  # the re-basing branch of the rollback ran too


def test_out_of_step_is_refused_before_the_hook_moves_positions():
    model, make_cache = _sink_setup()
    cache = make_cache()
    _hooked_forward(model, cache, random_ids(1, 6))
    handle = _fault_once(model, 1)
    with pytest.raises(RuntimeError, match="injected fault"):
        _hooked_forward(model, cache, random_ids(1, 2))
    handle.remove()
    before = (cache._real_seen.clone(), cache._base.clone())
    with pytest.raises(RuntimeError, match=r"layer 0 has seen 8 token\(s\) but layer 2 has seen 6.*reset\(\)"):
        cache.begin_forward(1, 2, None, torch.device("cpu"))
    assert torch.equal(cache._real_seen, before[0]) and torch.equal(cache._base, before[1])


def test_in_step_layers_never_trip_the_check():
    """Generation with every cache (chunked prefill, decode, beam search) passes the out-of-step check."""
    model, make_cache = _sink_setup()
    prompt = random_ids(2, 9)
    out = model.generate(
        prompt,
        **cache_kwargs(make_cache()),
        max_new_tokens=12,
        do_sample=False,
        num_beams=2,
        attention_mask=torch.ones_like(prompt),
    )
    assert out.shape == (2, 21)
