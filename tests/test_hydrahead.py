"""The HydraHead layer equals the composition of its parts, written out by hand here."""

import copy
import dataclasses
import math
from collections import Counter
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from hhbench.kernels import registry
from hhbench.kernels.hybrid import HybridCore, head_index
from hhbench.kernels.reference import gdn_recurrent
from hhbench.layers import glue, hydrahead
from hhbench.layers.glue import GlueOps
from hhbench.layers.hydrahead import (
    HydraAttention,
    _kernel_dtype,
    apply_rope,
    rope_cos_sin,
    rope_table,
    select_slots,
)
from hhbench.layers.network import HybridLM
from hhbench.spec.hybrid import HybridSpec, Layout, Ratio
from hhbench.spec.layout import HeadSplit, build_plan
from hhbench.spec.shapes import PRESETS

ALL_FA = tuple(range(8))  # a layer without GDN heads: a layer-wise hybrid's FA layer


def make_layer(fa_heads, n_heads=8, n_kv=4, d=8, hidden=32, **kw):
    layer = HydraAttention(hidden, n_heads, n_kv, d, fa_heads, chunk_size=16, rope_theta=500.0, **kw).double()
    with torch.no_grad():  # everything away from its initial value, so that each part matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def by_hand(layer: HydraAttention, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, KV, d, group = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.n_heads // layer.n_kv_heads
    q, k, v = (x @ layer.qkv.weight.T).split([H * d, KV * d, KV * d], dim=-1)
    q, k, v = q.view(B, T, H, d), k.view(B, T, KV, d), v.view(B, T, KV, d)
    cos, sin = rope_cos_sin(torch.arange(T), d, layer.rope_theta, x.dtype)
    fa, la = layer.split.fa_heads, layer.split.la_heads
    heads = {}
    for h in fa:  # causal softmax attention on this head's query and its KV group, with RoPE
        qh = apply_rope(q[:, :, h : h + 1], cos, sin)[:, :, 0]
        kh = apply_rope(k[:, :, h // group : h // group + 1], cos, sin)[:, :, 0]
        scores = qh @ kh.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads[h] = scores.softmax(-1) @ v[:, :, h // group]
    if la:
        gdn = layer.gdn

        def conv(t, weight):  # depthwise causal conv over time, then SiLU
            t = t.reshape(B, T, -1).transpose(1, 2)
            out = F.conv1d(F.pad(t, (weight.shape[1] - 1, 0)), weight.unsqueeze(1), groups=t.shape[1])
            return F.silu(out).transpose(1, 2).reshape(B, T, len(la), d)

        groups = [h // group for h in la]
        q_la = F.normalize(conv(q[:, :, list(la)], gdn.conv_q), dim=-1)
        k_la = F.normalize(conv(k[:, :, groups], gdn.conv_k), dim=-1)
        v_la = conv(v[:, :, groups], gdn.conv_v)
        decay = -gdn.A_log.exp() * F.softplus(x @ gdn.a_proj.weight.T + gdn.dt_bias)
        beta = torch.sigmoid(x @ gdn.b_proj.weight.T)
        o_la, _ = gdn_recurrent(q_la, k_la, v_la, decay, beta)
        gate = F.silu(x @ gdn.g_proj.weight.T).view(B, T, len(la), d)
        for i, h in enumerate(la):
            heads[h] = o_la[:, :, i]
    out = []
    for h in range(H):  # original head order; every head normalized and scaled when the layer has GDN heads
        o = heads[h]
        if la:
            o = o / o.pow(2).mean(-1, keepdim=True).add(layer.norm_eps).sqrt()
            o = o * layer.head_norm_weight[h] * layer.head_gamma[h]
            if h in la:
                o = o * gate[:, :, la.index(h)]
        out.append(o)
    return torch.cat(out, dim=-1) @ layer.o_proj.weight.T


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(1, 6), (0, 1, 2), (5,), ALL_FA, ()])
def test_layer_equals_its_parts(fa_heads, glue_name):
    layer = make_layer(fa_heads, glue=glue_name)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    expected = by_hand(layer, x)
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-9), (got - expected).abs().max()


def test_all_fa_layer_is_plain_attention_without_head_norms():
    layer = make_layer(ALL_FA)
    assert layer.gdn is None and not hasattr(layer, "head_gamma")


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
def test_gamma_scales_its_own_head_only(glue_name):
    layer = make_layer((1, 6), glue=glue_name)  # fused: its weights, gamma folded in, follow in-place changes
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    with torch.no_grad():
        base = layer(x)
        layer.head_gamma[3] += 1.0
        changed = layer(x) - base
        # the change is exactly head 3's slice pushed through o_proj: zero out that slice's columns to verify
        layer.o_proj.weight[:, 3 * 8 : 4 * 8] = 0
        layer.head_gamma[3] -= 1.0
        base_without = layer(x)
        layer.head_gamma[3] += 1.0
        assert torch.allclose(layer(x), base_without)
    assert changed.abs().max() > 1e-3


def test_rope_matches_hugging_face():
    """apply_rope on full tables and the fused path's glue op on half tables (rows of the shared rope_table, at an
    offset as decode slices them) both rotate as Hugging Face's apply_rotary_pos_emb does."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16)  # HF layout [B, H, T, d]
    cos, sin = rope_cos_sin(torch.arange(3, 13), 16, 10000.0, torch.float32)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    half_cos, half_sin = (t[3:13] for t in rope_table(13, 16, 10000.0, "cpu", torch.float32))
    assert torch.equal(half_cos, cos[:, :8]) and torch.equal(half_sin, sin[:, 8:])  # the tables repeat each half
    for x, expected in ((q, q_hf), (k, k_hf)):
        assert torch.allclose(apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2), expected, atol=1e-6)
        got = glue.rope_half(x.transpose(1, 2), half_cos, half_sin).transpose(1, 2)
        assert torch.allclose(got, expected, atol=1e-6)


def test_rope_tables_grow_and_serve_training_after_inference():
    """The shared tables grow to a power of two when a longer one is asked, and are made outside inference mode:
    a training step after an inference_mode call (the first to ask for them) saves them for its backward."""
    with torch.inference_mode():
        assert rope_table(5, 8, 777.0, "cpu", torch.float64)[0].shape == (8, 4)  # theta 777: tables of this test
    layer = make_layer((1, 6), glue="fused")
    layer.rope_theta = 777.0
    layer(torch.randn(1, 7, 32, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert rope_table(9, 8, 777.0, "cpu", torch.float64)[0].shape == (16, 4)


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(0, 1, 2), ALL_FA])
def test_training_after_an_inference_mode_call(fa_heads, glue_name):
    """A layer's first call under inference_mode (evaluation) makes the index tensors kept per device (head_index)
    and the fused weights kept while the parameters hold; a training step after it saves them for its backward,
    which inference tensors refuse. Also a frozen layer whose input takes gradients (its kept weights are used)."""
    head_index.cache_clear()  # made by this test's inference call, not by an earlier test's
    layer = make_layer(fa_heads, qk_norm=True, glue=glue_name)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    with torch.inference_mode():
        expected = layer(x)
    layer(x.clone().requires_grad_()).sum().backward()
    layer.requires_grad_(False)
    with torch.inference_mode():
        layer(x)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    out.sum().backward()
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12) and xi.grad.abs().sum() > 0


@pytest.mark.parametrize("fa_heads", [(1, 6), ALL_FA])
def test_a_layer_made_in_inference_mode_runs_the_fused_glue(fa_heads):
    """Parameters made under inference_mode (a model built or loaded for evaluation there) are inference tensors,
    which have no version counter: the fused weights are kept by their storage and dtype alone (fused raised)."""
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.inference_mode():
        reference = make_layer(fa_heads, qk_norm=True)
        fused = make_layer(fa_heads, qk_norm=True, glue="fused")
        fused.load_state_dict(reference.state_dict())
        for _ in range(2):  # made, then kept
            assert torch.allclose(fused(x), reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(1, 6), ()])
def test_decode_without_gradients_continues_a_prefill_made_in_inference_mode(fa_heads, glue_name):
    """A prompt prefilled under inference_mode (evaluation), then decoded under no_grad (a generation loop's): the
    cache's conv state made in inference mode is an inference tensor, which the fused decode advances in place (its
    conv update) and torch refuses to write outside inference mode; the steps are the full forward's."""
    layer = make_layer(fa_heads, qk_norm=True, glue=glue_name)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 12, "cpu", x.dtype)
    with torch.inference_mode():
        outs = [layer(x[:, :9], cache=cache)]
    with torch.no_grad():
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(9, 12)]
    assert torch.allclose(torch.cat(outs, 1), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_tables", [1, 2])
def test_fused_glue_takes_hugging_faces_tables(batch_tables):
    """(cos, sin) as Hugging Face passes them, [1, T, d] (its half is the glue op's table) or one per sequence
    [B, T, d] (apply_rope): the same output as the layer's own tables."""
    layer = make_layer((0, 1, 2), glue="fused")
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cos, sin = (t[None].expand(batch_tables, -1, -1) for t in rope_cos_sin(torch.arange(11), 8, 500.0, x.dtype))
    with torch.no_grad():
        assert torch.allclose(layer(x, (cos, sin)), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads, qk_norm, n_kv", [((1, 6), False, 4), ((1, 6), True, 4), ((0, 1, 4, 5), False, 4),
                                                     ((0, 1, 2), False, 4), ((), False, 4), ((), True, 4),
                                                     (ALL_FA, False, 8), (ALL_FA, True, 4)])  # fmt: skip
def test_decode_with_cache_continues_the_prefill(fa_heads, qk_norm, n_kv, glue_name):
    """A cached prefill, then token by token: each output is the full forward's (one sequence too: the fused path
    then takes the output gate from its one projection GEMM); with gradients recorded too (the fused path then
    composes its inputs under autograd instead of slot_norm_rope)."""
    layer = make_layer(fa_heads, n_kv=n_kv, glue=glue_name, qk_norm=qk_norm)
    for batch, recording in ((2, False), (1, False), (1, True)):
        x = torch.randn(batch, 21, 32, dtype=torch.float64)
        with torch.set_grad_enabled(recording):
            full = layer(x)
            cache = layer.new_cache(batch, 21, "cpu", torch.float64)
            first = layer(x[:, :18], cache=cache)
            steps = [layer(x[:, t : t + 1], cache=cache) for t in range(18, 21)]
        assert torch.allclose(first, full[:, :18], atol=1e-10)
        assert torch.allclose(torch.cat(steps, 1), full[:, 18:], atol=1e-10)


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(1, 6), ALL_FA, ()])
def test_a_cached_continuation_of_several_tokens_is_refused(fa_heads, glue_name):
    """Decode takes one token a call: more failed deep inside the step with a shape error (the fused GDN-only layer
    without conv reached the GDN step with heads three tokens wide, where a GPU kernel need not check)."""
    layer = make_layer(fa_heads, conv_size=0, glue=glue_name)
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(1, 8, "cpu", torch.float64)
        layer(x[:, :5], cache=cache)
        with pytest.raises(ValueError, match="one token"):
            layer(x[:, 5:8], cache=cache)


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(0, 1, 2), ALL_FA])
def test_a_decode_step_past_the_caches_capacity_is_refused_until_it_grows(fa_heads, glue_name):
    """A step on a full KV cache raises ValueError naming ensure_capacity, before it changes any state (the reference
    glue's write broadcast the new token into an empty slice and attended without it: a wrong output; the fused
    glue's raised slot_norm_rope's shape error); grown by LayerCache.ensure_capacity, it is the full forward's."""
    layer = make_layer(fa_heads, glue=glue_name)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 5, "cpu", torch.float64)
        layer(x[:, :5], cache=cache)
        with pytest.raises(ValueError, match="holds 5 tokens.*ensure_capacity"):
            layer(x[:, 5:6], cache=cache)
        cache.ensure_capacity(6)
        step = layer(x[:, 5:6], cache=cache)
    assert cache.length == 6 and cache.k.shape[1] == 10  # doubled
    torch.testing.assert_close(step, full[:, 5:], rtol=1e-10, atol=1e-10)


def test_a_cache_gives_its_k_and_v_at_a_position_as_views():
    """LayerCache.kv_at: the K and V slices [B, 1, G, d] at one token position, views that write the cache there and
    nowhere else (a decode step's writes go through them), of a head-major cache [B, G, S, d] seen as [B, S, G, d]
    too."""
    cache = make_layer((0, 1, 2)).new_cache(2, 5, "cpu", torch.float64)
    B, S, G, d = cache.k.shape
    head_major = tuple(torch.zeros(B, G, S, d, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    for buffers in ((cache.k, cache.v), head_major):
        cache.k, cache.v = buffers
        k, v = cache.kv_at(3)
        assert k.shape == v.shape == (B, 1, G, d) and k.stride() == cache.k.stride() and v.stride() == cache.v.stride()
        k.fill_(1.0), v.fill_(2.0)
        assert (cache.k[:, 3:4] == 1).all() and (cache.v[:, 3:4] == 2).all()
        assert cache.k.sum() == k.numel() and cache.v.sum() == 2 * v.numel()  # nothing beside the position written


@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(0, 1, 2), ALL_FA])
def test_decode_takes_a_head_major_kv_cache(fa_heads, glue_name):
    """A LayerCache whose K and V are head-major buffers [B, G, S, d] seen as [B, S, G, d] (slots strided, as Hugging
    Face lays caches out): the fused step, whose slot_norm_rope writes only caches with contiguous slots, writes it by
    copies (it raised ValueError), and the steps and the cache are the full forward's."""
    layer = make_layer(fa_heads, glue=glue_name)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 7, "cpu", torch.float64)
        head_major = [torch.zeros(2, t.shape[2], 7, 8, dtype=torch.float64) for t in (cache.k, cache.v)]
        cache.k, cache.v = (t.transpose(1, 2) for t in head_major)
        steps = [layer(x[:, :4], cache=cache), *(layer(x[:, t : t + 1], cache=cache) for t in range(4, 7))]
        expected = layer.new_cache(2, 7, "cpu", torch.float64)
        layer(x, cache=expected)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head_major[0].transpose(1, 2), expected.k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head_major[1].transpose(1, 2), expected.v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fa_heads, n_kv", [((1, 6), 4), ((0, 1, 2), 4), ((), 4), (ALL_FA, 4), (ALL_FA, 8)])
def test_fused_glue_trains_like_the_reference(fa_heads, n_kv):
    """Qwen2/3 options on (biases, q/k norms): outputs and every gradient of the fused composition (torch twins of
    fla's ops) equal the reference glue's, and so do its outputs without autograd; its weights are made from the parameters on each call under autograd (a
    layer without GDN heads, GQA or MHA, takes its qkv and o_proj parameters as they are)."""
    options = {"n_kv": n_kv, "qk_norm": True, "qkv_bias": True, "o_bias": True, "gdn_gate_bias": True}
    reference, fused = make_layer(fa_heads, **options), make_layer(fa_heads, glue="fused", **options)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    grads = []
    for layer in (reference, fused):
        for _ in range(2):  # twice: a second call must not reuse weights detached from the parameters
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.pow(2).sum().backward()
        grads.append([out, xi.grad, *(p.grad for p in layer.parameters())])
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10), (got - expected).abs().max()
    with torch.no_grad():  # without autograd the fused path takes its inputs by slot_norm_rope
        assert torch.allclose(fused(x), reference(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fa_heads, n_kv", [((1, 6), 4), ((0, 1, 2), 4), ((), 4), (ALL_FA, 4), ((5,), 4), ((3,), 8)])
def test_fused_decode_steps_train_like_the_reference(fa_heads, n_kv):
    """Decode steps under autograd after a cached prefill (the fused path copies the FA k and v parts of
    slot_norm_rope, whose decode plan takes the groups' v slots too, into the cache, so that autograd records the
    writes): the outputs and every gradient, through the cache back to the prefill's inputs, equal the reference
    glue's; uneven GQA (heads 0, 1, 2) included, and one FA head on one KV group (SDPA's backward saved the cache's
    tokens as a view there, which the next step's write changed: both glues raised in backward)."""
    options = {"n_kv": n_kv, "qk_norm": True, "qkv_bias": True}
    reference, fused = make_layer(fa_heads, **options), make_layer(fa_heads, glue="fused", **options)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    results = []
    for layer in (reference, fused):
        xi = x.clone().requires_grad_()
        cache = layer.new_cache(2, 8, "cpu", torch.float64)
        layer(xi[:, :5], cache=cache)
        out = torch.cat([layer(xi[:, t : t + 1], cache=cache) for t in range(5, 8)], 1)
        out.pow(2).sum().backward()
        results.append([out, xi.grad, *(p.grad for p in layer.parameters())])
    for got, expected in zip(*results[::-1], strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_a_second_derivative_through_the_fused_glue_is_refused():
    """slot_norm_rope's backward builds no graph: a backward with create_graph (a second derivative) through the
    fused path raises, rather than give a wrong second derivative (40% off the reference glue's here; before
    slot_norm_rope took training's inputs, 19 times it); the reference glue takes it."""
    x = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
    layer = make_layer((1, 6), qk_norm=True, glue="fused")
    with pytest.raises(RuntimeError, match="not differentiable: no second derivative"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    layer.glue = "reference"
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    assert torch.autograd.grad(grad.pow(2).sum(), x)[0].abs().sum() > 0


def test_a_layer_wise_model_through_the_fused_glue_equals_the_reference():
    """Layer 3:1 end to end (tiny: three full GDN layers and one FA layer, MLPs, embedding, LM head): with every
    layer's glue fused, the logits, every gradient, and decode after a cached prefill are the reference glue's."""
    plan = build_plan(PRESETS["tiny"], HybridSpec(Layout.LAYER, Ratio.parse("3:1")))
    reference = HybridLM(plan).double()
    fused = copy.deepcopy(reference)
    for block in fused.blocks:
        block.attention.glue = "fused"
    assert [block.attention.gdn is None for block in fused.blocks].count(True) == 1
    ids = torch.randint(0, 256, (2, 13))
    results = []
    for model in (reference, fused):
        logits = model(ids)
        logits.pow(2).mean().backward()
        with torch.no_grad():
            caches = model.new_caches(2, 13, "cpu", torch.float64)
            steps = [model(ids[:, :10], caches), *(model(ids[:, t : t + 1], caches) for t in range(10, 13))]
        results.append([logits, *steps, *(p.grad for p in model.parameters())])
    for got, expected in zip(results[1], results[0], strict=True):
        assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10), (got - expected).abs().max()


class StepOps(TorchDispatchMode):
    """Counts the aten ops that compute or copy (views left out) which a layer step runs. A call of a glue op or of the core's backends (unit) counts as one op, as it is one fused kernel on the GPU (or
    the FA and GDN kernels the floor times), whatever its torch twin runs inside; the core's outputs come back dense,
    as cuDNN's and fla's do. GEMMs (mm, bmm, addmm and its in-place accumulate) count as "gemm"."""

    def __init__(self):
        super().__init__()
        self.ops, self.active, self.inside = Counter(), False, False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def _record(self, name: str):
        self.ops["gemm" if name in ("mm", "bmm", "addmm", "addmm_") else name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        writes = any(r.alias_info is None or r.alias_info.is_write for r in func._schema.returns)
        name = func.overloadpacket.__name__
        if not self.inside and writes and name != "_unsafe_view" and isinstance(out, torch.Tensor | tuple | list):
            self._record(name)
        return out

    def unit(self, name: str, fn):
        def call(*args, **kwargs):
            if self.inside or not self.active:
                return fn(*args, **kwargs)
            self.inside = True
            try:
                out = fn(*args, **kwargs)
                if name == "core":
                    out = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, out)
            finally:
                self.inside = False
            self._record(name)
            return out

        return call

    def glue_ops(self) -> GlueOps:
        """glue.TORCH's ops, each a unit."""
        ops = glue.TORCH
        return GlueOps(ops.name, *(self.unit(f.name, getattr(ops, f.name)) for f in dataclasses.fields(ops)[1:]))


def step_ops(layer: HydraAttention, x: torch.Tensor, monkeypatch) -> tuple[StepOps, StepOps]:
    """The ops of one fused prefill of x and of one decode step after it (StepOps), weights already made."""
    counts = StepOps(), StepOps()
    for count in counts:
        units = count.glue_ops()
        monkeypatch.setattr(layer, "_glue_ops", lambda core, device, units=units: units)
        for method in ("prefill_parts", "decode_parts"):
            monkeypatch.setattr(HybridCore, method, count.unit("core", getattr(HybridCore, method)))
        with torch.no_grad():
            cache = layer.new_cache(x.shape[0], x.shape[1] + 2, "cpu", x.dtype)
            layer(x, cache=cache)  # the weights made, the cache filled
            with count:
                layer(x) if count is counts[0] else layer(x[:, :1], cache=cache)
        monkeypatch.undo()
    return counts


# A fused step's ops with fla's kernels in the glue ops, and without autograd: the projection GEMM (the GDN heads'
# output gate included: head_norms reads its strided view; under autograd a GEMM of its own, which fla's gated norm
# takes without a copy);
# slot_norm_rope, one kernel that gathers the FA heads' q, k and v the kernel takes (in decode the GDN heads' too),
# normalizes Qwen3's q and k slots and rotates the FA heads' (before it, RoPE, the q/k norm and its multiply, and a
# gather or two: 1-5 ops); in prefill slot_conv, one kernel from the GDN heads' slots, a and b to their kernel's q, k,
# v, decay and beta (before it, their part of slot_norm_rope, three convs, the GDN kernel's L2 norms of q and k, the
# gate and a sigmoid), in decode one conv update of the q, k and v, the gates inside the GDN step (fla's recurrent
# kernel takes a and b raw); the FA and GDN kernels (core); head_norms, one kernel for the gated norm of the GDN
# heads and the norm of the FA heads (before it, fla's two), written in o_proj's column order; o_proj as one GEMM
# (before, one over the GDN heads and an accumulate of the FA heads'). Decode's slot_norm_rope also writes the new
# token's K and V into the cache (before, two copy_ a step).
FUSED_PREFILL = {"gemm": 2, "slot_norm_rope": 1, "slot_conv": 1, "core": 1, "head_norms": 1}
FUSED_DECODE = {**FUSED_PREFILL, "slot_conv": 0, "conv_update": 1}
# A layer without GDN heads (a layer-wise hybrid's FA layer): the projection GEMM, slot_norm_rope (RoPE, and the q/k
# norms where the shape has them; in decode the cache writes), the FA kernel and o_proj. The reference glue ran 16 ops
# a prefill and 18 a decode step there (RoPE's tables made per call: arange, casts, cos, sin, cat; rotate-half: neg,
# cat, mul, add), 29 and 31 with Qwen3's q/k norms.
PLAIN_PREFILL = {"gemm": 2, "slot_norm_rope": 1, "core": 1}
PLAIN_DECODE = PLAIN_PREFILL


@pytest.mark.parametrize("fa_heads, n_kv, qk_norm", [
    ((1, 6), 4, False), ((0, 1, 4, 5), 4, False), ((1, 6), 4, True), ((), 4, False), ((), 4, True),
    ((1, 6), 8, False), ((1, 6), 8, True), (ALL_FA, 8, False), (ALL_FA, 4, True),
])  # fmt: skip
def test_a_fused_step_runs_no_glue_beyond_its_kernels(fa_heads, n_kv, qk_norm, monkeypatch):
    """Pins every op of a fused prefill and decode step without autograd (on the GPU a kernel each): no per-call
    RoPE table, no copy of the projection or of the heads' outputs (a layer with FA and GDN heads ran 24 ops a step
    with them), no gather, norm or RoPE of the q, k and v slots outside slot_norm_rope, with or without GQA and q/k
    norms."""
    layer = make_layer(fa_heads, n_kv=n_kv, qk_norm=qk_norm, glue="fused")
    prefill, decode = step_ops(layer, torch.randn(1, 9, 32, dtype=torch.float64), monkeypatch)
    plain = layer.gdn is None
    expected = (
        [Counter(PLAIN_PREFILL), Counter(PLAIN_DECODE)] if plain else [Counter(FUSED_PREFILL), Counter(FUSED_DECODE)]
    )
    if not fa_heads:  # no slot of an FA head to prepare: slot_conv takes the GDN heads' own
        expected[0].subtract(slot_norm_rope=1)
    assert +prefill.ops == +expected[0]
    assert +decode.ops == +expected[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["projection", "odd offset", "odd row stride", "strided last dim"])
def test_select_slots_is_index_select(dtype, layout):
    """Values and gradients equal index_select's, slots taken twice included, whether the slots go as 8-byte words
    (a view of the projection: rows of 64-multiple width) or, where the layout does not allow it, as elements."""
    width = {"projection": 64 * 7, "odd offset": 64 * 7, "odd row stride": 64 * 7 + 1, "strided last dim": 64 * 12}
    base = torch.randn(2, 5, width[layout], dtype=dtype, requires_grad=True)
    start = 1 if layout == "odd offset" else 0
    t = base[..., start : start + 48 * 8].unflatten(-1, (48, 8))
    if layout == "strided last dim":
        t = base[..., : 48 * 8 * 2 : 2].unflatten(-1, (48, 8))
    index = torch.tensor([5, 5, 2, 40, 47, 5, 0])
    expected_base = base.detach().clone().requires_grad_()
    expected_t = expected_base[..., start : start + 48 * 8].unflatten(-1, (48, 8))
    if layout == "strided last dim":
        expected_t = expected_base[..., : 48 * 8 * 2 : 2].unflatten(-1, (48, 8))
    got, expected = select_slots(t, index), expected_t.index_select(2, index)
    assert torch.equal(got, expected)
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad)
    assert torch.equal(base.grad, expected_base.grad)
    by_words = hydrahead._as_words(t) is not None
    assert by_words == (layout == "projection" and dtype != torch.float64)
    with torch.no_grad():
        assert torch.equal(select_slots(t, index), expected)
    with pytest.raises(IndexError):
        select_slots(t, torch.tensor([48]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_select_slots_takes_memory_off_an_8_byte_bound_by_elements(dtype):
    """Memory that starts off an 8-byte bound at storage offset 0 (DLPack's, a buffer's at a byte offset) is not
    viewed as words: CUDA faults on misaligned 8-byte loads (the CPU does not, so the values alone cannot tell)."""
    raw = torch.randn(2, 3, 4, 8, dtype=dtype).view(torch.uint8).flatten().numpy()
    shifted = numpy.empty(raw.size + 2, dtype=numpy.uint8)[2:]  # numpy's buffers start on 16 bytes
    shifted[:] = raw
    t = torch.from_numpy(shifted).view(dtype).view(2, 3, 4, 8)
    assert t.storage_offset() == 0 and t.data_ptr() % 8
    assert hydrahead._as_words(t) is None
    index = torch.tensor([3, 0, 3])
    assert torch.equal(select_slots(t, index), t.index_select(2, index))


class GatherShapes(StepOps):
    """StepOps, and the shapes of the tensors that gathers and index adds outside the glue ops read."""

    GATHERS = ("index_select", "index_add", "index_add_", "index_copy", "index_copy_", "gather", "index")

    def __init__(self):
        super().__init__()
        self.gathered = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and func.overloadpacket.__name__ in self.GATHERS:
            self.gathered.append(tuple(args[0].shape))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("fa_heads, qk_norm", [((3, 10), True), ((3, 10), False), ((), True), (tuple(range(16)), True)])
def test_a_fused_training_step_prepares_its_inputs_by_one_op_and_its_backward(fa_heads, qk_norm, monkeypatch):
    """Head 7:1 of Qwen3-1.7B's heads (GDN heads sharing KV groups), a GDN layer and a plain attention layer: a
    training step takes its q, k and v by one slot_norm_rope and gives their gradient back by one
    slot_norm_rope_backward (on the GPU a kernel each), with no gather, index add, norm or RoPE of the slots outside
    them (before: fla's norm and rotary, a multiply and gathers, each with its backward)."""
    layer = HydraAttention(64, 16, 8, 8, fa_heads, qk_norm=qk_norm, glue="fused")
    count = GatherShapes()
    units = count.glue_ops()
    monkeypatch.setattr(layer, "_glue_ops", lambda core, device: units)
    with count:
        layer(torch.randn(2, 6, 64)).pow(2).sum().backward()
    assert count.ops["slot_norm_rope"] == count.ops["slot_norm_rope_backward"] == 1, count.ops
    assert not [shape for shape in count.gathered if shape[:2] == (2, 6)], count.gathered  # activations, not weights
    assert count.ops["norm"] == (0 < len(fa_heads) < 16), count.ops  # the FA heads' outputs' only


@pytest.mark.parametrize("fa_heads", [(0, 8), (0,), (0, 4, 8, 12), (1, 2, 3), (), tuple(range(16))])
def test_fused_views_start_and_stride_on_16_bytes(fa_heads):
    """Kernels that read the projection in place (cuDNN attention through TMA) need 16-byte strides and offsets:
    head 7:1 of Qwen3-1.7B (14 GDN heads) gave a 7964-wide bf16 row and wrong attention on an H200."""
    layer = HydraAttention(256, 16, 8, 128, fa_heads, glue="fused").to(torch.bfloat16)
    seen = []
    original = layer._fused_inputs

    def spy(*args, **kwargs):
        outputs = original(*args, **kwargs)
        fa, la, _, _, gate = outputs  # a and b [B, T, n_la] go through torch and fla's copying input guard
        seen.extend(t for t in (*(fa or ()), *(la if isinstance(la, tuple) else (la,)), gate) if t is not None)
        return outputs

    layer._fused_inputs = spy
    with torch.no_grad():
        layer(torch.randn(1, 8, 256, dtype=torch.bfloat16))
    assert layer._fused_weights().projection.shape[0] % 64 == 0
    for view in seen:
        offset = view.storage_offset() * view.element_size()
        strides = [s * view.element_size() for s, n in zip(view.stride(), view.shape, strict=True) if s != 1 and n > 1]
        assert offset % 16 == 0 or view.is_contiguous(), (view.shape, offset)
        assert all(s % 16 == 0 for s in strides), (view.shape, view.stride())


def test_glue_choice(monkeypatch):
    """auto is the reference on the CPU; fused uses the torch twins there. On CUDA auto fuses where fla imports and
    the GDN heads, if any, run on fla's backends: a layer without GDN heads (its core has no GDN backend) fuses
    whatever backend the model's GDN layers use, and holds no copy of its weights."""
    from hhbench.layers.hydrahead import HybridCore

    torch_chunk, fla_chunk = (registry.get(name, registry.GDN) for name in ("torch-chunk", "fla-chunk"))
    core, plain_core = HybridCore(None, torch_chunk), HybridCore(None, None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert make_layer((1,))._glue_ops(core, cpu) is None
    assert make_layer((1,), glue="fused")._glue_ops(core, cpu) is glue.TORCH
    assert make_layer(ALL_FA)._glue_ops(plain_core, cpu) is None
    plain = make_layer(ALL_FA, glue="fused")
    assert plain._glue_ops(plain_core, cpu) is glue.TORCH
    with torch.no_grad():
        weights = plain._fused_weights()
    assert weights.projection is plain.qkv.weight and weights.o is plain.o_proj.weight
    fla = GlueOps("fla", *dataclasses.astuple(glue.TORCH)[1:])  # stands for fla's ops: no CUDA here
    monkeypatch.setattr(glue, "fla_ops", lambda: fla)
    for available in (True, False):
        monkeypatch.setattr(glue, "fla_available", lambda available=available: available)
        assert make_layer(ALL_FA)._glue_ops(plain_core, cuda) is (fla if available else None)
        assert make_layer((1,))._glue_ops(HybridCore(None, fla_chunk), cuda) is (fla if available else None)
        assert make_layer((1,))._glue_ops(core, cuda) is None  # torch-chunk: the reference glue
    with pytest.raises(ValueError, match="glue"):
        make_layer((1,), glue="fast")


def test_head_split_gqa_bookkeeping():
    split = HeadSplit(8, (0, 1, 4, 5), group_size=2)
    assert split.fa_groups == (0, 2) and split.fa_gqa_uniform and split.la_kv_groups() == (1, 1, 3, 3)
    uneven = HeadSplit(8, (0, 1, 2), group_size=2)
    assert not uneven.fa_gqa_uniform and uneven.fa_kv_index() == (0, 0, 1)


def test_hybrid_core_runs_both_backends_on_their_heads():
    core = HybridCore(registry.get("sdpa-math", registry.FA), registry.get("torch-chunk", registry.GDN), chunk_size=8)
    q = torch.randn(1, 12, 1, 8)
    gdn = (F.normalize(torch.randn(1, 12, 3, 8), dim=-1), F.normalize(torch.randn(1, 12, 3, 8), dim=-1),
           torch.randn(1, 12, 3, 8), -torch.rand(1, 12, 3), torch.rand(1, 12, 3))  # fmt: skip
    fa_out, (la_out, _) = core.prefill_parts((q, q, q), gdn)
    assert fa_out.shape == (1, 12, 1, 8) and la_out.shape == (1, 12, 3, 8)
    assert torch.allclose(
        fa_out,
        F.scaled_dot_product_attention(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True
        ).transpose(1, 2),
        atol=1e-6,
    )
    assert torch.allclose(la_out, gdn_recurrent(*gdn)[0], atol=1e-5)


def test_a_layer_resolves_its_backends_once_or_takes_them_resolved():
    cpu, f64 = torch.device("cpu"), torch.float64
    named = make_layer((1,))  # auto: resolved on first use per device, pass and dtype, then kept
    with torch.no_grad():
        named(torch.randn(1, 8, 32, dtype=f64))
    assert named._core("prefill", cpu, f64) is named._core("prefill", cpu, f64)
    assert named._core("prefill", cpu, f64).gdn_backend.name == "torch-chunk"
    assert named._core("decode", cpu, f64).gdn_backend.name == "torch-recurrent"
    recurrent = registry.get("torch-recurrent", registry.GDN)
    given = make_layer((1,), fa_backend=registry.get("sdpa-math", registry.FA), gdn_backend=recurrent)
    assert given._core("prefill", cpu, f64).gdn_backend is recurrent  # the sweep's: its point already chose it
    with torch.no_grad():
        out = given(torch.randn(1, 8, 32, dtype=torch.float64))
    assert out.shape == (1, 8, 32) and torch.isfinite(out).all()


def test_a_layer_on_the_gpu_picks_its_auto_backends_by_dtype(monkeypatch):
    """A layer resolves `auto` by the dtype it is called in: on CUDA cuDNN attention for bf16 and fp16, SDPA's
    memory-efficient kernel for fp32, which cuDNN does not take (auto gave every dtype cuDNN, and the GPU test's fp32
    gamma fit called it with fp32 inputs, which SDPA refuses: "No available kernel"). Resolution only: every CUDA
    backend counts as available."""
    monkeypatch.setattr(registry.Backend, "unavailable", lambda self, device: None)
    cuda = torch.device("cuda")
    layer = make_layer((1, 6))
    for dtype, fa in ((torch.float32, "sdpa-efficient"), (torch.bfloat16, "sdpa-cudnn"), (torch.float16, "sdpa-cudnn")):
        core = layer._core("train", cuda, dtype)
        assert (core.fa_backend.name, core.gdn_backend.name) == (fa, "fla-chunk"), dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the projections cast: the kernels see autocast's dtype
        assert _kernel_dtype(torch.randn(1, 4, 32)) == torch.bfloat16


@pytest.mark.parametrize(
    "extras",
    [
        {"qk_norm": True},
        {"qkv_bias": True},
        {"qkv_bias": True, "o_bias": True},
        {"mlp_bias": True},
        {"mlp_hidden": 0, "vocab": 0},
    ],  # the last: an attention-only shape, as h32d128 (its blocks' pre-norms)
)
@pytest.mark.parametrize("layout, ratio", [(Layout.HEAD, "3:1"), (Layout.LAYER, "3:1")])
def test_measured_layers_hold_the_shapes_norms_and_biases(extras, layout, ratio):
    """A point of a Qwen3 shape times Qwen3's q/k norms, of a Qwen2 shape its q/k/v biases, of a Llama shape with
    mlp_bias its MLP biases: the layer- and model-scope modules (shape_attention, HybridLM) hold exactly the
    parameters the analytic model counts."""
    from hhbench.analytic.costs import analytic_costs
    from hhbench.analytic.memory import layer_weight_params
    from hhbench.layers.network import shape_attention
    from hhbench.spec.axes import Pass

    shape = dataclasses.replace(PRESETS["tiny"], name="tiny-extras", **extras)
    plan = build_plan(shape, HybridSpec(layout, Ratio.parse(ratio)))
    for layer in plan.layers:
        attention = shape_attention(plan, layer.fa_heads)
        assert (attention.q_norm is not None) == shape.qk_norm
        assert (attention.qkv.bias is not None) == shape.qkv_bias and (
            attention.o_proj.bias is not None
        ) == shape.o_bias
        params = sum(p.numel() for p in attention.parameters())
        assert params == layer_weight_params(shape, layer, plan.spec.gdn)
    model = HybridLM(plan)
    analytic = analytic_costs(plan, Pass.PREFILL, 1, dtype="fp32").weight_bytes / 4
    assert sum(p.numel() for p in model.parameters()) == analytic


class OutputShapes(TorchDispatchMode):
    """The shapes of the tensors that ops which compute or copy (views left out) make."""

    def __init__(self):
        super().__init__()
        self.made = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and all(r.alias_info is None for r in func._schema.returns):
            self.made[func.overloadpacket.__name__, tuple(out.shape)] += 1
        return out


@pytest.mark.parametrize("fa_heads, n_kv, qk_norm", [
    ((1, 6), 4, False), ((1, 6), 4, True), ((0, 1, 4, 5), 4, False), ((), 4, False), ((1, 6), 8, False),
])  # fmt: skip
def test_a_fused_training_step_makes_the_projections_gradient_once(fa_heads, n_kv, qk_norm):
    """The parts a fused prefill takes from the projection's output (q and k slots, FA v, a, b, the GDN heads' k and
    v) hand back their gradients into one buffer: one zero tensor of the output's size, no per-view zero tensor and
    no adds of them (which cost a layer with FA and GDN heads six such tensors and four adds a step), and the
    gradients those parts give are still the reference glue's."""
    layer = make_layer(fa_heads, n_kv=n_kv, qk_norm=qk_norm, glue="fused")
    n_la = layer.gdn.n_heads
    width = len(layer.fused_rows) + 2 * n_la
    width += -width % 64
    x = torch.randn(1, 9, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    shapes = OutputShapes()
    with shapes:
        out.pow(2).sum().backward()
    projection_sized = {key: n for key, n in shapes.made.items() if key[1] in ((1, 9, width), (9, width))}
    assert projection_sized == {("new_zeros", (1, 9, width)): 1}, projection_sized
    reference = copy.deepcopy(layer)
    reference.glue = "reference"
    xr = x.detach().clone().requires_grad_()
    reference(xr).pow(2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-9, atol=1e-11)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-11), name


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("glue_name", ["reference", "fused"])
@pytest.mark.parametrize("fa_heads", [(1, 6), ()])
def test_a_bf16_layer_gives_its_gdn_kernel_g_and_beta_in_fp32(fa_heads, glue_name, grad, monkeypatch):
    """A bf16 layer hands its GDN kernel the decay g and beta in fp32, with either glue, under autograd (the fused
    path: fla's gate and a sigmoid) and without (slot_conv), as the floor's GDN part does: FlashQLA compiles its
    kernels per beta dtype (its kkt_solve's b_dtype), so a bf16 beta in training ran other kernels than the floor's,
    compiled apart (results/floor-h200-v8). Their values are GatedDeltaNetHeads.gates' on the layer's input."""
    layer = make_layer(fa_heads, glue=glue_name).to(torch.bfloat16)
    x = torch.randn(1, 9, 32, dtype=torch.bfloat16)
    taken = []
    prefill_parts = HybridCore.prefill_parts

    def spy(core, fa, gdn, **options):
        taken.append(gdn)
        return prefill_parts(core, fa, gdn, **options)

    monkeypatch.setattr(HybridCore, "prefill_parts", spy)
    with torch.set_grad_enabled(grad):
        layer(x)
    ((*_, g, beta),) = taken
    with torch.no_grad():
        expected = layer.gdn.gates(x)
    for got, want in zip((g, beta), expected, strict=True):
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), (got - want).abs().max()


def test_the_glue_host_time_experiment_times_the_fused_prefill_and_decode_with_its_stubs():
    """experiments/glue_host_time.py (results/glue-host-cpu) follows the fused path's op signatures: its stubs stand in
    for every glue op and the core, and a prefill and a decode step run through them."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "glue_host_time.py"
    spec = importlib.util.spec_from_file_location("glue_host_time", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fa_heads in module.LAYOUTS.values():
        times = module.step_us(fa_heads, 55)
        assert set(times) == {"prefill", "decode"}
        assert all(0 < t["p10_us"] <= t["median_us"] <= t["p90_us"] for t in times.values()), times
    # a step count that leaves nothing after the warm-up, or no count, is one line and exit 2 (it was a traceback)
    assert module.steps_of([]) == 300 and module.steps_of([str(module.WARMUP + 1)]) == module.WARMUP + 1
    for argv in ([str(module.WARMUP)], ["ten"], ["60", "70"]):
        with pytest.raises(SystemExit) as exited:
            module.steps_of(argv)
        assert exited.value.code == 2, argv
