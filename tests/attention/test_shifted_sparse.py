"""sink_s2attn / sink_sfattn (training S²-Attn and SF-Attn) vs the fp64 dense-mask spec, causality, models, PEFT."""

import types

import pytest
import torch
from helpers import random_ids, sink_mask, tiny_model
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

import hf_sinks
from hf_sinks.attention.reference import (
    reference_shifted_sparse_attention,
    shifted_sparse_group,
    shifted_sparse_visible,
)
from hf_sinks.attention.shifted_sparse import (
    group_size_for,
    num_sink_tokens_for,
    shifted_sparse_attention,
    sink_s2attn_attention_forward,
    sink_sfattn_attention_forward,
)
from hf_sinks.compat import cache_kwargs, enable_activation_checkpointing
from hf_sinks.training.learned_sinks import AttentionSinkLogits

NAMES = ("sink_s2attn", "sink_sfattn")
FUNCTIONS = {"sink_s2attn": sink_s2attn_attention_forward, "sink_sfattn": sink_sfattn_attention_forward}


def qkv(batch, heads, kv_heads, length, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def padding(kind, batch, length):
    if kind is None:
        return None
    mask = torch.ones(batch, length, dtype=torch.bool)
    if kind == "left":
        mask[-1, :3] = False
    elif kind == "right":
        mask[0, -4:] = False
    else:  # holes anywhere
        mask[-1, [1, 4, 5]] = False
    return mask


def real_rows(out, mask):
    """``[B, H, T, D]`` -> the real-token rows ``[N, H, D]`` (padding queries are unspecified)."""
    out = out.transpose(1, 2)
    return out.reshape(-1, *out.shape[2:]) if mask is None else out[mask]


# ------------------------------------------------------------------------------------ the spec itself
def test_spec_groups_are_the_non_wrapping_partitions():
    # G = 4: plain [0,4) [4,8) [8,10); shifted [0,2) [2,6) [6,10): the head of the sequence is its own group
    assert [shifted_sparse_group(t, 4, False) for t in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [shifted_sparse_group(t, 4, True) for t in range(10)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # G = 5 (odd): shift 2
    assert [shifted_sparse_group(t, 5, True) for t in range(8)] == [0, 0, 1, 1, 1, 1, 1, 2]
    # head 1 of 2 is shifted: token 2 starts a new group there, not in head 0
    assert not shifted_sparse_visible(2, 1, 1, 2, 10, 4) and shifted_sparse_visible(2, 1, 0, 2, 10, 4)
    assert shifted_sparse_visible(4, 3, 1, 2, 10, 4) and not shifted_sparse_visible(4, 3, 0, 2, 10, 4)
    # token 1 never sees token 9 (the roll-based public code puts both in its last group)
    assert not shifted_sparse_visible(1, 9, 1, 2, 10, 4)
    # sinks: causal, global, only with S > 0
    assert shifted_sparse_visible(9, 1, 0, 2, 10, 4, num_sink_tokens=2)
    assert not shifted_sparse_visible(9, 1, 0, 2, 10, 4, num_sink_tokens=0)
    assert not shifted_sparse_visible(0, 1, 0, 2, 10, 4, num_sink_tokens=2)
    # T <= G: plain causal everywhere
    assert all(shifted_sparse_visible(7, j, 1, 2, 8, 8) for j in range(8))


def test_spec_with_one_group_is_causal_attention():
    q, k, v = qkv(1, 2, 2, 7)
    ref = reference_shifted_sparse_attention(q, k, v, group_size=7)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ref, expected)


# ------------------------------------------------------------------------------ implementation vs spec
CASES = [
    # batch, heads, kv_heads, length, group, sinks, padding
    pytest.param(1, 4, 4, 16, 4, 0, None, id="divisible"),
    pytest.param(2, 4, 2, 13, 4, 0, "left", id="odd-length-gqa-left-pad"),
    pytest.param(2, 4, 2, 13, 5, 2, "right", id="odd-group-sinks-right-pad"),
    pytest.param(2, 6, 3, 11, 4, 3, "holes", id="gqa-half-splits-kv-group-holes"),
    pytest.param(1, 3, 1, 9, 3, 1, None, id="odd-heads-mqa"),
    pytest.param(2, 4, 1, 7, 8, 2, "left", id="dense-fallback"),
    pytest.param(1, 2, 2, 10, 2, 4, None, id="group-2-sinks-span-groups"),
    pytest.param(1, 4, 2, 12, 4, 20, None, id="more-sinks-than-tokens"),
    pytest.param(1, 1, 1, 9, 4, 1, None, id="one-head-no-shifted-half"),
]


@pytest.mark.parametrize("learned", [False, True], ids=["", "sink-logits"])
@pytest.mark.parametrize("batch,heads,kv_heads,length,group,sinks,pad", CASES)
def test_forward_and_gradients_match_the_spec(batch, heads, kv_heads, length, group, sinks, pad, learned):
    q, k, v = qkv(batch, heads, kv_heads, length)
    mask = padding(pad, batch, length)
    logits = torch.linspace(-1, 1, heads, dtype=torch.float64).requires_grad_(True) if learned else None
    grad_out = torch.randn(batch, heads, length, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    outs = []
    for fn in (shifted_sparse_attention, reference_shifted_sparse_attention):
        out = fn(q, k, v, group, sinks, mask, scaling=0.4, sink_logits=logits)
        # the loss reads real queries only (as labels=-100 would)
        weight = grad_out if mask is None else grad_out * mask[:, None, :, None]
        params = [q, k, v] + ([logits] if learned else [])
        grads.append(torch.autograd.grad((out * weight).sum(), params))
        outs.append(real_rows(out.detach(), mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_sliding_window_limits_group_keys_but_never_the_sinks():
    q, k, v = qkv(1, 4, 2, 14)
    out = shifted_sparse_attention(q, k, v, 6, 2, sliding_window=3)
    ref = reference_shifted_sparse_attention(q, k, v, 6, 2, sliding_window=3)
    torch.testing.assert_close(out, ref)
    assert shifted_sparse_visible(5, 0, 0, 4, 14, 6, num_sink_tokens=1, sliding_window=3)  # sink inside the group


def test_s2_and_sf_differ_and_padding_equals_the_unpadded_row():
    q, k, v = qkv(1, 4, 2, 12)
    s2 = shifted_sparse_attention(q, k, v, 4, 0)
    sf = shifted_sparse_attention(q, k, v, 4, 2)
    assert not torch.allclose(s2[:, :, 4:], sf[:, :, 4:])  # later groups see the sinks
    torch.testing.assert_close(s2[:, :, :2], sf[:, :, :2])  # the first tokens are sinks of every group anyway
    # a left-padded copy of the same row is split exactly like the unpadded row
    pad = 3
    grow = lambda x: torch.cat([torch.randn(1, x.shape[1], pad, 8, dtype=x.dtype), x], dim=2)  # noqa: E731
    mask = torch.tensor([[False] * pad + [True] * 12])
    padded = shifted_sparse_attention(grow(q), grow(k), grow(v), 4, 2, mask)
    torch.testing.assert_close(padded[:, :, pad:], sf)


# ------------------------------------------------------------------------------------------ causality
def roll_s2attn(q, k, v, group_size):
    """The public LongLoRA eager S²-Attn (roll, group-wise causal attention, roll back): it wraps around."""
    b, h, t, d = q.shape
    half = group_size // 2

    def shift(x):
        return torch.cat([x[:, : h - h // 2], x[:, h - h // 2 :].roll(-half, dims=2)], dim=1)

    def groups(x):
        return x.unflatten(2, (t // group_size, group_size))

    out = torch.nn.functional.scaled_dot_product_attention(
        groups(shift(q)), groups(shift(k)), groups(shift(v)), is_causal=True
    )
    out = out.flatten(2, 3)
    return torch.cat([out[:, : h - h // 2], out[:, h - h // 2 :].roll(half, dims=2)], dim=1)


def future_leaks(attention, length=16, cut=6):
    """True if outputs before ``cut`` depend on q/k/v at or after ``cut`` (by perturbation and by gradient)."""
    q, k, v = qkv(1, 4, 4, length)
    base = attention(q, k, v)
    (gq, gk, gv) = torch.autograd.grad(base[:, :, :cut].sum(), (q, k, v))
    noise = lambda x: torch.cat([x[:, :, :cut], x[:, :, cut:] + torch.randn_like(x[:, :, cut:])], dim=2)  # noqa: E731
    perturbed = attention(noise(q), noise(k), noise(v))
    changed = not torch.allclose(base[:, :, :cut], perturbed[:, :, :cut], rtol=0, atol=1e-12)
    grad_reaches_future = any(bool(g[:, :, cut:].abs().max() > 0) for g in (gq, gk, gv))
    return changed or grad_reaches_future


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("group", [4, 5, 16])
def test_no_future_token_leaks(sinks, group):
    for cut in (1, 3, 6, 13):
        assert not future_leaks(lambda q, k, v: shifted_sparse_attention(q, k, v, group, sinks), cut=cut)


def test_the_causality_check_catches_the_wrap_around_of_the_roll_implementation():
    assert future_leaks(lambda q, k, v: roll_s2attn(q, k, v, 4), cut=3)


# ------------------------------------------------------------------- the registered functions, as models call them
def module(training=True, num_key_value_groups=2, **config):
    cfg = types.SimpleNamespace(model_type="llama", **config)
    return types.SimpleNamespace(config=cfg, training=training, num_key_value_groups=num_key_value_groups)


def model_mask(padding_mask, length):
    return sink_mask(padding_mask, length)


@pytest.mark.parametrize("name", NAMES)
def test_registered_function_reads_config_and_padding(name):
    q, k, v = qkv(2, 4, 2, 13)
    mask = padding("left", 2, 13)
    sinks = 3 if name == "sink_sfattn" else 0
    mod = module(s2attn_group_size=4, sfattn_num_sink_tokens=3)
    out, weights = FUNCTIONS[name](mod, q, k, v, model_mask(mask, 13), dropout=0.0, scaling=0.4, position_ids=None)
    assert weights is None and out.shape == (2, 13, 4, 8)
    ref = reference_shifted_sparse_attention(q, k, v, 4, sinks, mask, scaling=0.4)
    torch.testing.assert_close(out[mask], ref.transpose(1, 2)[mask])


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_plain_causal_attention(name):
    q, k, v = qkv(1, 4, 2, 13)
    out, _ = FUNCTIONS[name](module(training=False, s2attn_group_size=4), q, k, v, None, scaling=0.4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_with_learned_sink_logits_is_the_spec(name):
    from hf_sinks.attention.reference import reference_sink_attention

    q, k, v = qkv(1, 4, 2, 13)
    mod = module(training=False, s2attn_group_size=4)
    mod.sink_logits = torch.linspace(-1, 1, 4, dtype=torch.float64)
    out, _ = FUNCTIONS[name](mod, q, k, v, None, scaling=0.4)
    expected = reference_sink_attention(q, k, v, 0, 13, None, scaling=0.4, sink_logits=mod.sink_logits)
    torch.testing.assert_close(out, expected.transpose(1, 2).detach())


def test_dropout_is_honoured_in_training():
    q, k, v = qkv(1, 4, 2, 12)
    call = lambda p: sink_sfattn_attention_forward(module(s2attn_group_size=4), q, k, v, None, dropout=p)[0]  # noqa: E731
    torch.testing.assert_close(call(0.0), call(0.0))
    torch.manual_seed(1)
    a = call(0.5)
    torch.manual_seed(2)
    b = call(0.5)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, call(0.0))


def test_config_defaults_and_sources():
    cfg = types.SimpleNamespace()
    assert group_size_for(cfg, 8192) == 2048  # LongLoRA: a quarter of the training length
    assert group_size_for(cfg, 5) == 2
    assert group_size_for(types.SimpleNamespace(s2attn_group_size_ratio=0.5), 100) == 50
    assert group_size_for(types.SimpleNamespace(s2attn_group_size=64), 100) == 64
    assert num_sink_tokens_for(cfg) == 4
    assert num_sink_tokens_for(types.SimpleNamespace(attention_sinks={"num_sink_tokens": 2, "window_length": 8})) == 2
    assert (
        num_sink_tokens_for(types.SimpleNamespace(sfattn_num_sink_tokens=0, attention_sinks={"num_sink_tokens": 2}))
        == 0
    )


@pytest.mark.parametrize(
    "config,match",
    [
        ({"s2attn_group_size": 1}, r"s2attn_group_size=1 .*int >= 2"),
        ({"s2attn_group_size": "64"}, r"s2attn_group_size='64'"),
        ({"s2attn_group_size": True}, r"s2attn_group_size=True"),
        ({"s2attn_group_size_ratio": 0}, r"s2attn_group_size_ratio=0 .*\(0, 1\]"),
        ({"s2attn_group_size_ratio": 1.5}, r"s2attn_group_size_ratio=1.5"),
        ({"s2attn_group_size": 8, "s2attn_group_size_ratio": 0.25}, r"both set"),
        ({"sfattn_num_sink_tokens": -1}, r"sfattn_num_sink_tokens=-1 .*int >= 0"),
        ({"attention_sinks": {"num_sink_tokens": -2}}, r"num_sink_tokens"),
    ],
)
def test_bad_config_values_raise_naming_the_value(config, match):
    q, k, v = qkv(1, 2, 2, 12)
    with pytest.raises(ValueError, match=match):
        sink_sfattn_attention_forward(module(**config), q, k, v, None)


def test_bad_masks_and_sink_logits_raise():
    q, k, v = qkv(1, 2, 2, 12)
    with pytest.raises(ValueError, match=r"2D padding mask.*\(1, 1, 12, 12\)"):
        sink_s2attn_attention_forward(module(s2attn_group_size=4), q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool))
    mod = module(s2attn_group_size=4)
    mod.sink_logits = torch.zeros(3)
    with pytest.raises(ValueError, match=r"sink_logits must be a \[2\] tensor, got \(3,\)"):
        sink_s2attn_attention_forward(mod, q, k, v, None)


# --------------------------------------------------------------------------------------- tiny models
ARCHS = ["llama", "mistral", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_from_config_train_eval_and_switching(arch):
    assert all(n in AttentionInterface._global_mapping and n in AttentionMaskInterface._global_mapping for n in NAMES)
    model = tiny_model(arch, "sink_sfattn")
    model.config.s2attn_group_size = 4
    ids = random_ids(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    reference = tiny_model(arch, "sdpa")
    with torch.no_grad():
        dense = reference(ids, attention_mask=mask).logits
        model.train()
        sparse = model(ids, attention_mask=mask).logits
        model.eval()
        evaluated = model(ids, attention_mask=mask).logits
        # training with a sequence no longer than a group: plain causal attention
        model.train()
        model.config.s2attn_group_size = 16
        short = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert not torch.allclose(sparse[real], dense[real], atol=1e-4)
    torch.testing.assert_close(evaluated, dense)
    torch.testing.assert_close(short[real], dense[real])
    for name in ("sdpa", "sink_sdpa", "sink_s2attn"):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
    model.eval()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **cache_kwargs(DynamicCache(config=model.config))
    )
    expected = reference.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        **cache_kwargs(DynamicCache(config=reference.config)),
    )
    assert torch.equal(out, expected)


def test_with_a_sink_cache_it_streams_like_sink_sdpa():
    ids = random_ids(1, 20)
    logits = []
    for name in ("sink_sfattn", "sink_sdpa"):
        model = tiny_model("llama", name)
        cache = hf_sinks.SinkCache(2, 6)
        with torch.no_grad():
            logits.append(
                torch.cat([model(ids[:, i : i + 5], **cache_kwargs(cache)).logits for i in range(0, 20, 5)], 1)
            )
    torch.testing.assert_close(logits[0], logits[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_peft_lora_forward_backward(arch, name):
    peft = pytest.importorskip("peft")
    model = tiny_model(arch, name)
    model.config.s2attn_group_size = 4
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["query_key_value"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    lora.train()
    ids = random_ids(2, 14)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().max() > 0) for g in grads)


def test_learned_sink_logits_train_through_peft_modules_to_save():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", "sink_sfattn")
    model.config.s2attn_group_size = 4
    for layer in model.model.layers:
        layer.self_attn.sink_logits = AttentionSinkLogits(model.config.num_attention_heads, init_value=-1.0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["sink_logits"])
    lora = peft.get_peft_model(model, config)
    lora.train()
    ids = random_ids(1, 12)
    lora(input_ids=ids, labels=ids).loss.backward()
    trained = [p for n, p in lora.named_parameters() if "sink_logits" in n and p.requires_grad]
    assert trained and all(p.grad is not None and bool(p.grad.abs().max() > 0) for p in trained)
    # eval: plain causal attention, still with the sink column (what training saw)
    attn = model.model.layers[0].self_attn
    q, k, v = qkv(1, 4, 2, 6)
    attn_eval = types.SimpleNamespace(config=model.config, training=False, sink_logits=attn.sink_logits)
    out, _ = sink_sfattn_attention_forward(attn_eval, q.float(), k.float(), v.float(), None, scaling=0.4)
    logits = attn.sink_logits().detach().double()
    ref = reference_shifted_sparse_attention(q, k, v, 6, 0, scaling=0.4, sink_logits=logits)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = random_ids(2, 14)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama", "sink_sfattn")
        model.config.s2attn_group_size = 4
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=use_reentrant)
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------- the fused kernel behind backend="triton"
def _kernel_problem():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from hf_sinks.attention.shifted_sparse_kernel import triton_unavailable_reason

    return triton_unavailable_reason(torch.device("cpu"))


@pytest.mark.interpreter
@pytest.mark.parametrize("batch,heads,kv_heads,length,group,sinks,pad", [c for c in CASES if c.values[4] % 2 == 0])
def test_fused_kernel_backend_matches_the_spec(batch, heads, kv_heads, length, group, sinks, pad):
    """``backend="triton"`` (the Triton kernel; CPU interpreter here) computes the same function as the spec,
    forward and gradients, with the argument mapping of ``shifted_sparse_attention`` (packing, dense fallback)."""
    problem = _kernel_problem()
    if problem is not None:
        pytest.skip(f"the Triton kernel cannot run in this process: {problem}")
    q, k, v = (t.detach().float().requires_grad_(True) for t in qkv(batch, heads, kv_heads, length))
    mask = padding(pad, batch, length)
    if pad == "holes":
        mask = padding("left", batch, length)  # the kernel needs one contiguous run; holes are packed first anyway
    logits = torch.linspace(-1, 1, heads).requires_grad_(True)
    grad_out = torch.randn(batch, heads, length, 8, generator=torch.Generator().manual_seed(5))
    weight = grad_out if mask is None else grad_out * mask[:, None, :, None]
    results = []
    for backend in ("triton", "spec"):
        if backend == "spec":
            out = reference_shifted_sparse_attention(
                q.double(), k.double(), v.double(), group, sinks, mask, scaling=0.4, sink_logits=logits.double()
            )
        else:
            out = shifted_sparse_attention(
                q, k, v, group, sinks, mask, scaling=0.4, sink_logits=logits, backend=backend
            )
        grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), [q, k, v, logits])
        results.append((real_rows(out.detach().float(), mask), [g.float() for g in grads]))
    (out_k, grads_k), (out_s, grads_s) = results
    torch.testing.assert_close(out_k, out_s, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads_k, grads_s):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_backend_never_picks_the_interpreter_and_odd_groups_or_dropout_stay_on_sdpa():
    from hf_sinks.attention.shifted_sparse import _use_kernel

    cpu = torch.device("cpu")
    assert not _use_kernel(cpu, "auto", 0.0, 4)  # CPU: SDPA path even when the interpreter could run the kernel
    assert not _use_kernel(cpu, "triton", 0.0, 5)  # odd G: the kernel's partition differs, SDPA path
    assert not _use_kernel(cpu, "triton", 0.1, 4)  # dropout: the kernel has none
    with pytest.raises(ValueError, match="backend='cuda'"):
        _use_kernel(cpu, "cuda", 0.0, 4)
