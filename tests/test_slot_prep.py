"""slot_norm_rope, the fused path's input preparation: glue's torch twin against a slot-by-slot composition of torch's
RMSNorm and Hugging Face-style RoPE, and the Triton kernel (slot_prep.py; Triton's interpreter on CPU tensors,
conftest sets TRITON_INTERPRET=1) against the twin, and in a layer's fused path against the reference glue."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F

from hhbench.layers import glue
from hhbench.layers.glue import SlotPlan
from hhbench.layers.hydrahead import apply_rope
from tests.conftest import ROOT

triton = pytest.importorskip("triton")
_version = lambda text: tuple(int(part) for part in text.split(".")[:2])  # noqa: E731
needs_interpreter = pytest.mark.skipif(
    _version(triton.__version__) < (3, 8) and _version(numpy.__version__) >= (2, 4),
    reason="Triton's interpreter before 3.8 fails on numpy >= 2.4 (scalar arguments)",
)

# FA q, FA k (RoPE'd), then GDN q, k (two heads share a k slot: GQA) and v: the parts of a prefill step
PLAN = SlotPlan(sources=(0, 1, 2, 4, 5, 3, 3, 6, 6), kinds=(0, 0, 1, 0, 0, 1, 1, 2, 2), sizes=(3, 2, 2, 2), n_rope=3)
# FA q, then the GDN heads' q, k and v as one part (a joined part: decode's); slots 1 and 2 unread
JOINED = SlotPlan(sources=(0, 4, 5, 3, 3, 6, 6), kinds=(0, 0, 0, 1, 1, 2, 2), sizes=(1, 6), n_rope=1)
# a decode step's: FA q (two heads), k and v (two groups each, the second shared by a GDN head: its k and v slots read
# twice), then the GDN head's q, k and v joined
DECODE = SlotPlan(sources=(0, 1, 2, 3, 5, 6, 4, 3, 6), kinds=(0, 0, 1, 1, 2, 2, 0, 1, 2), sizes=(2, 2, 2, 3), n_rope=4)


# The kernels' cases in Triton's interpreter, forward and backward
KERNEL_PLANS = pytest.mark.parametrize("plan", [PLAN, JOINED, DECODE], ids=["prefill", "joined", "decode"])
KERNEL_CASES = pytest.mark.parametrize(
    ("B", "T", "d", "per_sequence", "norm", "dtype"),
    [
        (2, 35, 16, False, True, torch.float32),  # three blocks of 32 tokens across two sequences, the last partial
        (3, 1, 12, True, True, torch.float32),  # decode; a half of 6 (masked to 8 lanes); per-sequence tables
        (1, 9, 16, True, False, torch.float32),  # without q/k norms
        (1, 9, 16, False, True, torch.float16),
        (2, 40, 12, True, True, torch.float64),  # in fp64, as the twin (fp32 was off by 5e-7); a masked half
    ],
)


def _inputs(B, T, d, per_sequence, dtype):
    """Head slots as views of a projection output [B, T, W] with columns beyond the slots (so strided), weights and
    RoPE half tables."""
    torch.manual_seed(0)
    out = torch.randn(B, T, 7 * d + 5, dtype=dtype)
    slots = out[..., : 7 * d].unflatten(-1, (7, d))
    weight = (1 + 0.3 * torch.randn(2, d)).to(dtype)
    angles = torch.rand(B if per_sequence else 1, T, d // 2) * 6
    cos, sin = (f(angles).to(dtype) for f in (torch.cos, torch.sin))
    return slots, weight, (cos if per_sequence else cos[0]), (sin if per_sequence else sin[0])


def _by_slot(slots, plan, weight, eps, cos, sin):
    """Each destination alone, in fp64: F.rms_norm with its row of the weight, then RoPE with full tables."""
    full = [torch.cat([t, t], -1).double() for t in (cos, sin)]
    rows = []
    for j, (source, kind) in enumerate(zip(plan.sources, plan.kinds, strict=True)):
        x = slots[:, :, source : source + 1].double()
        if weight is not None and kind < 2:
            x = F.rms_norm(x, (x.shape[-1],), weight[kind].double(), eps)
        rows.append(apply_rope(x, *full) if j < plan.n_rope else x)
    return torch.cat(rows, 2).split(plan.sizes, 2)


@pytest.mark.parametrize("plan", [PLAN, JOINED], ids=["prefill", "joined"])
@pytest.mark.parametrize(("B", "T", "d", "per_sequence", "norm"), [(2, 37, 16, False, True), (3, 1, 12, True, False)])
def test_the_torch_twin_is_the_slot_by_slot_composition(plan, B, T, d, per_sequence, norm):
    slots, weight, cos, sin = _inputs(B, T, d, per_sequence, torch.float32)
    weight = weight if norm else None
    got = glue.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    want = _by_slot(slots, plan, weight, 1e-6, cos, sin)
    assert [t.shape for t in got] == [(B, T, n, d) for n in plan.sizes] and all(t.is_contiguous() for t in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@needs_interpreter
@KERNEL_PLANS
@KERNEL_CASES
def test_the_triton_kernel_is_the_torch_twin(plan, B, T, d, per_sequence, norm, dtype):
    from hhbench.layers import slot_prep

    slots, weight, cos, sin = _inputs(B, T, d, per_sequence, dtype)
    weight = weight if norm else None
    got = slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    want = glue.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_the_kernel_refuses_a_strided_head_dim():
    from hhbench.layers import slot_prep

    slots = torch.randn(1, 4, 7, 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous, even last dim"):
        slot_prep.slot_norm_rope(slots, PLAN, None, 1e-6, None, None)
    with pytest.raises(ValueError, match="contiguous, even last dim"):
        slot_prep.slot_norm_rope_backward([], slots, PLAN, None, 1e-6, None, None, slots)


def test_the_kernels_refuse_a_plan_of_more_parts_than_their_pointer_arguments():
    from hhbench.layers import slot_prep

    plan = SlotPlan(sources=tuple(range(6)), kinds=(2,) * 6, sizes=(1,) * 6, n_rope=0)
    slots = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="up to 5 parts, not 6"):
        slot_prep.slot_norm_rope(slots, plan, None, 1e-6, None, None)
    with pytest.raises(ValueError, match="up to 5 parts, not 6"):
        slot_prep.slot_norm_rope_backward([slots[:, :, :1]] * 6, slots, plan, None, 1e-6, None, None, slots)


def _caches(B, T, d, dtype, position=3):
    """Two KV cache buffers [B, T + 5, 2, d] filled with 7, and `into` for DECODE's FA k and v parts: their slices at
    tokens position..position+T-1 (strided over sequences and tokens)."""
    caches = [torch.full((B, T + 5, 2, d), 7.0, dtype=dtype) for _ in range(2)]
    return caches, {1: caches[0][:, position : position + T], 2: caches[1][:, position : position + T]}


@needs_interpreter
@pytest.mark.parametrize(
    ("B", "T", "dtype", "cache_dtype"),
    [
        (2, 1, torch.float32, torch.float32),  # a decode step
        (3, 1, torch.float64, torch.float64),
        (2, 35, torch.float32, torch.float32),  # two blocks of tokens a sequence
        (2, 5, torch.float64, torch.float64),
        (2, 1, torch.float32, torch.float64),  # a cache of another dtype: written in its own
        (2, 1, torch.float16, torch.float32),  # an fp32 cache of half activations (autocast's)
    ],
)
def test_the_kernel_writes_parts_into_cache_slices_as_the_twin(B, T, dtype, cache_dtype):
    """slot_norm_rope's `into`: DECODE's FA k and v parts written into slices of KV caches (batch and token strides
    of the whole cache), and given back as those slices; the twin's are its parts without `into`, copied, and the
    kernel's the twin's, values of the slots' dtype in a cache of a wider one as the twin's copies (and the prefill's
    cache writes) hold; the caches' other tokens are left as they are."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin = _inputs(B, T, 12, True, dtype)
    plain = glue.slot_norm_rope(slots, DECODE, weight, 1e-6, cos, sin)
    results = []
    for op in (glue.slot_norm_rope, slot_prep.slot_norm_rope):
        caches, into = _caches(B, T, 12, cache_dtype)
        parts = op(slots, DECODE, weight, 1e-6, cos, sin, into=into)
        assert parts[1] is into[1] and parts[2] is into[2]
        assert parts[0].dtype == parts[3].dtype == dtype and parts[0].is_contiguous() and parts[3].is_contiguous()
        for cache in caches:
            assert (cache[:, :3] == 7).all() and (cache[:, 3 + T :] == 7).all()
        results.append(parts)
    twin, kernel = results
    for p, (got, want) in enumerate(zip(twin, plain, strict=True)):
        assert torch.equal(got, want.to(got.dtype)), p
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)
    for got, want in zip(kernel, twin, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert torch.equal(got, got.to(dtype).to(got.dtype))


@needs_interpreter
def test_the_kernel_and_the_twin_refuse_a_destination_unlike_its_part():
    """A destination of another shape, with strided slots or last dim, with elements in one place (a cache expanded
    over sequences, as a prompt's for several samples: torch's copy refused it, the kernel's programs raced on its
    one slice), or for a part the plan has not: ValueError from both, before anything is written."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin = _inputs(2, 1, 12, True, torch.float32)
    (cache, _), _ = _caches(2, 1, 12, torch.float32)
    wide = torch.zeros(2, 1, 2, 24)
    bad = {
        "shape": {1: cache[:, 3:5]},
        "slots": {1: wide[..., :12]},
        "last dim": {2: wide[..., ::2]},
        "expanded": {1: cache[:1, 3:4].expand(2, -1, -1, -1)},
        "part": {4: cache[:, 3:4]},
    }
    for name, into in bad.items():
        for op in (glue.slot_norm_rope, slot_prep.slot_norm_rope):
            with pytest.raises(ValueError, match="slot_norm_rope writes part"):
                op(slots, DECODE, weight, 1e-6, cos, sin, into=into)
        assert (cache == 7).all() and (wide == 0).all(), name


@needs_interpreter
def test_the_kernel_and_the_twin_refuse_destinations_overlapping_the_slots_or_each_other():
    """A destination in the input slots' memory (the kernel would read slots it had written) or two in one place (two
    programs would write it): ValueError naming the parts, from both, before anything is written."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin = _inputs(2, 1, 12, True, torch.float32)
    before = slots.clone()
    (cache, _), _ = _caches(2, 1, 12, torch.float32)
    buffer = torch.full((2, 1, 3, 12), 7.0)
    bad = [
        ("part 1 overlaps the input slots", {1: slots[:, :, 5:7]}),  # slots 5 and 6, which DECODE reads
        ("part 2 overlaps the input slots", {1: cache[:, 3:4], 2: slots[:, :, 5:7]}),
        ("parts 1 and 2 overlap each other", {1: buffer[:, :, :2], 2: buffer[:, :, 1:]}),  # slot 1 of the buffer
        ("parts 1 and 2 overlap each other", {1: cache[:, 3:4], 2: cache[:, 3:4]}),
    ]
    for message, into in bad:
        for op in (glue.slot_norm_rope, slot_prep.slot_norm_rope):
            with pytest.raises(ValueError, match=message):
                op(slots, DECODE, weight, 1e-6, cos, sin, into=into)
        assert torch.equal(slots, before) and (cache == 7).all() and (buffer == 7).all(), message


@needs_interpreter
def test_destinations_apart_in_memory_are_taken():
    """Destinations apart from the slots and from each other are written as the twin's parts: decode's k and v KV
    cache slices at a position (two caches: hydrahead's _decode_fused), and k and v slices of one buffer
    [2, B, S, G, d], whose storage is one but whose spans are not."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin = _inputs(3, 1, 12, True, torch.float32)
    want = glue.slot_norm_rope(slots, DECODE, weight, 1e-6, cos, sin)
    for op in (glue.slot_norm_rope, slot_prep.slot_norm_rope):
        (k, v), _ = _caches(3, 1, 12, torch.float32)
        kv = torch.full((2, 3, 6, 2, 12), 7.0)
        for into in ({1: k[:, 3:4], 2: v[:, 3:4]}, {1: kv[0][:, 3:4], 2: kv[1][:, 3:4]}):
            parts = op(slots, DECODE, weight, 1e-6, cos, sin, into=into)
            assert parts[1] is into[1] and parts[2] is into[2]
            for got, expected in zip(parts, want, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _backward_inputs(B, T, d, per_sequence, dtype, plan):
    """_inputs, the parts' gradients (one part's strided over its slots, one broadcast along sequences and tokens: the
    kernel reads each destination's rows by its own strides) and a gradient buffer like the projection output's, filled
    with 7 where nothing is written."""
    slots, weight, cos, sin = _inputs(B, T, d, per_sequence, dtype)
    grads = [torch.randn(B, n, T, d, dtype=dtype).transpose(1, 2) for n in plan.sizes]
    grads[-1] = torch.randn(1, 1, plan.sizes[-1], d, dtype=dtype).expand(B, T, -1, -1)
    grad = torch.full((B, T, 7 * d + 5), 7.0, dtype=dtype)
    return slots, weight, cos, sin, grads, grad


def _slot_grads(grad, S, d):
    """The head slots [B, T, S, d] of a gradient buffer like the projection's output."""
    return grad[..., : S * d].unflatten(-1, (S, d))


@pytest.mark.parametrize("plan", [PLAN, JOINED], ids=["prefill", "joined"])
@pytest.mark.parametrize("norm", [True, False])
def test_the_twins_backward_is_autograd_through_the_slot_by_slot_composition(plan, norm):
    """glue.slot_norm_rope_backward writes the gradient of every slot the plan reads (slots read by several
    destinations, GQA, summed over them) and leaves the rest of the buffer alone (the joined plan reads 5 of the 7
    slots); the weight's gradient sums each row over its destinations."""
    slots, weight, cos, sin, grads, grad = _backward_inputs(2, 5, 8, False, torch.float64, plan)
    weight = weight.requires_grad_() if norm else None
    leaf = slots.detach().requires_grad_()
    torch.autograd.backward(_by_slot(leaf, plan, weight, 1e-6, cos, sin), grads)
    got_weight = glue.slot_norm_rope_backward(grads, slots, plan, weight, 1e-6, cos, sin, _slot_grads(grad, 7, 8))
    read, unread = list(plan.read), [s for s in range(7) if s not in plan.read]
    torch.testing.assert_close(_slot_grads(grad, 7, 8)[:, :, read], leaf.grad[:, :, read])
    assert (_slot_grads(grad, 7, 8)[:, :, unread] == 7).all() and (grad[..., 7 * 8 :] == 7).all()
    assert len(unread) == (2 if plan is JOINED else 0)
    if norm:
        torch.testing.assert_close(got_weight, weight.grad)
    else:
        assert got_weight is None


@needs_interpreter
@KERNEL_PLANS
@KERNEL_CASES
def test_the_triton_backward_kernel_is_autograd_through_the_twin(plan, B, T, d, per_sequence, norm, dtype):
    """slot_prep.slot_norm_rope_backward against glue.slot_norm_rope_backward (torch autograd through the twin): the
    same gradient buffer, read slots written and the rest left alone, and the same weight gradient."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin, grads, grad = _backward_inputs(B, T, d, per_sequence, dtype, plan)
    weight = weight if norm else None
    want = grad.clone()
    want_weight = glue.slot_norm_rope_backward(grads, slots, plan, weight, 1e-6, cos, sin, _slot_grads(want, 7, d))
    got_weight = slot_prep.slot_norm_rope_backward(grads, slots, plan, weight, 1e-6, cos, sin, _slot_grads(grad, 7, d))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)
    torch.testing.assert_close(grad, want, atol=tol, rtol=tol)
    if norm:
        assert got_weight.dtype == dtype
        torch.testing.assert_close(got_weight, want_weight, atol=tol * 10, rtol=tol)
    else:
        assert got_weight is None


@needs_interpreter
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the padding rows' 1 / sqrt(0), dropped by design
def test_the_backward_kernel_takes_an_eps_of_0_past_the_last_token():
    """A norm eps of 0 (a config's rms_norm_eps may be 0) and a partial block of tokens: the rows past the last token
    (zeros) must not reach the weight's gradient (their 1 / sqrt(eps) is inf, times 0 NaN)."""
    from hhbench.layers import slot_prep

    slots, weight, cos, sin, grads, grad = _backward_inputs(1, 9, 16, False, torch.float32, PLAN)
    want = grad.clone()
    want_weight = glue.slot_norm_rope_backward(grads, slots, PLAN, weight, 0.0, cos, sin, _slot_grads(want, 7, 16))
    got_weight = slot_prep.slot_norm_rope_backward(grads, slots, PLAN, weight, 0.0, cos, sin, _slot_grads(grad, 7, 16))
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_weight, want_weight, atol=1e-4, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("fa_heads", [(1, 6), tuple(range(8))], ids=["hybrid", "plain"])
def test_a_fused_layer_trains_alike_on_the_kernels_and_on_the_twins(fa_heads, monkeypatch):
    """A training step of a fused layer (Qwen3's q/k norms, GQA) through take_parts' node with the Triton kernels
    (interpreter) and with the torch twins: the same output and gradients, the parts' gradients as the layer's
    consumers hand them back (the FA kernel's, the convs')."""
    from hhbench.layers import slot_prep
    from hhbench.layers.hydrahead import HydraAttention

    layer = HydraAttention(32, 8, 4, 8, fa_heads, chunk_size=16, qk_norm=True, glue="fused")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    kernels = dataclasses.replace(
        glue.TORCH, slot_norm_rope=slot_prep.slot_norm_rope, slot_norm_rope_backward=slot_prep.slot_norm_rope_backward
    )
    x = torch.randn(2, 35, 32)
    results = []
    for ops in (glue.TORCH, kernels):
        monkeypatch.setattr(layer, "_glue_ops", lambda core, device, ops=ops: ops)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        results.append([out, xi.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*results, strict=True):  # relative to each tensor's norm: fp32 sums in another order
        assert ((got - want).norm() / want.norm()).item() < 1e-5, ((got - want).norm() / want.norm()).item()


@needs_interpreter
@pytest.mark.parametrize("trained", ["norms", "checkpointed", "checkpointed-reentrant"])
def test_a_fused_layer_on_the_kernels_trains_frozen_or_checkpointed_like_the_reference(trained, monkeypatch):
    """The kernels (not differentiable by torch: only take_parts' node gives their gradients) in a layer's training
    as fine-tuning and memory saving run it: only Qwen3's q/k norm weights trainable and an input without gradient
    (the projection's output then needs none), and under torch.utils.checkpoint (its forward once without and once
    with autograd, or saved tensors recomputed): the gradients of the reference glue's, in fp64."""
    from torch.utils.checkpoint import checkpoint

    from hhbench.layers import slot_prep
    from tests.test_hydrahead import make_layer

    kernels = dataclasses.replace(
        glue.TORCH, slot_norm_rope=slot_prep.slot_norm_rope, slot_norm_rope_backward=slot_prep.slot_norm_rope_backward
    )
    reference = make_layer((1, 6), qk_norm=True)
    fused = make_layer((1, 6), qk_norm=True, glue="fused")
    fused.load_state_dict(reference.state_dict())
    monkeypatch.setattr(fused, "_glue_ops", lambda core, device: kernels)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=trained != "norms")
    grads = []
    for layer in (reference, fused):
        for name, p in layer.named_parameters():
            p.requires_grad_(trained != "norms" or name.startswith(("q_norm", "k_norm")))
        x.grad = None
        if layer is fused and trained != "norms":
            out = checkpoint(layer, x, use_reentrant=trained.endswith("reentrant"))
        else:
            out = layer(x)
        out.pow(2).sum().backward()
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(*grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert sum(g is not None for g in grads[1]) == (2 if trained == "norms" else len(grads[1]))


def test_a_plan_reads_each_slot_as_one_kind():
    """The backward normalizes a source slot once and gives its gradient to one weight row: a slot read as a q and a k
    slot (or normed and as it is) is refused."""
    with pytest.raises(ValueError, match="source slot 3 is read as kinds"):
        SlotPlan(sources=(0, 3, 3), kinds=(0, 1, 2), sizes=(3,), n_rope=0)
    assert PLAN.read == DECODE.read == tuple(range(7)) and JOINED.read == (0, 3, 4, 5, 6)


@needs_interpreter
@pytest.mark.parametrize("fa_heads, n_kv", [((0, 3, 5), 4), ((0, 1, 2, 3, 4, 5, 6, 7), 4), ((), 2)])
def test_a_layer_through_the_kernel_equals_the_reference_glue(fa_heads, n_kv, monkeypatch):
    """The kernels where the GPU runs them, in the fused path of a layer (its own plans, tables and weights; the
    prefill's GDN inputs by slot_conv, whose conv state the decode steps continue; every step's head norms by
    head_norms): with Qwen3's q/k norms, GDN heads
    sharing KV groups with FA heads and not, per-sequence Hugging Face tables, a cached prefill and decode steps, the
    outputs of the reference glue in fp64."""
    from hhbench.layers import slot_prep
    from hhbench.layers.hydrahead import rope_cos_sin
    from tests.test_hydrahead import make_layer

    kernels = dataclasses.replace(
        glue.TORCH,
        slot_norm_rope=slot_prep.slot_norm_rope,
        slot_conv=slot_prep.slot_conv,
        head_norms=slot_prep.head_norms,
    )
    monkeypatch.setattr(glue, "TORCH", kernels)
    reference = make_layer(fa_heads, n_kv=n_kv, qk_norm=True)
    fused = make_layer(fa_heads, n_kv=n_kv, qk_norm=True, glue="fused")
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    positions = torch.stack([torch.arange(12), torch.randperm(12)])  # a table per sequence, not a shift of one
    cos, sin = (torch.stack(t) for t in zip(*(rope_cos_sin(p, 8, 500.0, x.dtype) for p in positions), strict=True))
    with torch.no_grad():
        expected = reference(x, (cos, sin))
        cache = fused.new_cache(2, 12, "cpu", x.dtype)
        got = [fused(x[:, :9], (cos[:, :9], sin[:, :9]), cache=cache)]
        got += [fused(x[:, t : t + 1], (cos[:, t : t + 1], sin[:, t : t + 1]), cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(got, 1), expected, rtol=1e-10, atol=1e-10)


# slot_conv: the GDN heads' inputs of a prefill without gradients. Three GDN heads: q slots 0, 4, 5; heads 1 and 2 share
# the KV group of k slot 3 and v slot 6 (GQA), head 0 has k slot 1 and v slot 2.
GDN_SOURCES = ((0, 4, 5), (1, 3, 3), (2, 6, 6))
CONV_CASES = pytest.mark.parametrize(
    ("B", "T", "d", "norm", "eps", "dtype", "state"),
    [
        (2, 150, 16, True, 1e-6, torch.float32, True),  # 5 programs of 32 tokens (4 runs of 8), the last partial
        (2, 37, 16, True, 1e-6, torch.float32, True),  # 2 programs: a run cut at token 37, 3 runs past it
        (2, 40, 12, True, 1e-6, torch.float64, False),  # a head dim of 12 (masked to 16 lanes)
        (1, 2, 8, True, 1e-6, torch.float64, True),  # fewer tokens than the conv's taps: a zero-padded state
        (1, 9, 16, False, 1e-6, torch.float32, True),  # without q/k norms
        (1, 9, 16, True, 0.0, torch.float32, True),  # an eps of 0: the zeros before the first token stay zeros
        (1, 9, 16, True, 1e-6, torch.float16, True),
    ],
)


def _conv_inputs(B, T, d, dtype, K=4):
    """_inputs' slots and norm weight (columns beyond the slots: strided), conv taps [3 n d, K] and the gates' inputs:
    a and b [B, T, n], views of one projection-like tensor (strided), A_log and dt_bias [n] (fp32 parameters)."""
    slots, weight, _, _ = _inputs(B, T, d, False, dtype)
    n = len(GDN_SOURCES[0])
    gate_columns = (3 * torch.randn(B, T, 2 * n + 3)).to(dtype)
    a, b = gate_columns[..., :n], gate_columns[..., n : 2 * n]
    A_log, dt_bias = torch.rand(n) * 2, torch.randn(n)
    return slots, weight, (0.5 * torch.randn(3 * n * d, K)).to(dtype), a, b, A_log, dt_bias


def _conv_by_head(slots, weight, eps, taps, a, b, A_log, dt_bias):
    """Each GDN head's q, k and v alone, in fp64: F.rms_norm with its weight row (q, k), F.conv1d over its own
    channels from zero padding, SiLU, F.normalize (q, k); the gates by their formulas; and each channel's last K
    inputs, zeros before the first."""
    d, K = slots.shape[-1], taps.shape[-1]
    heads, history = [], []
    for kind, sources in enumerate(GDN_SOURCES):
        outs = []
        for i, source in enumerate(sources):
            x = slots[:, :, source].double()
            if weight is not None and kind < 2:
                x = F.rms_norm(x, (d,), weight[kind].double(), eps)
            x = x.to(slots.dtype).double().transpose(1, 2)  # the conv's input in slots' dtype
            padded = F.pad(x, (K - 1, 0))
            row = (kind * len(sources) + i) * d
            y = F.silu(F.conv1d(padded, taps[row : row + d].double().unsqueeze(1), groups=d)).transpose(1, 2)
            outs.append(F.normalize(y, dim=-1, eps=1e-12) if kind < 2 else y)
            history.append(padded[..., -K:])
        heads.append(torch.stack(outs, 2))
    g = -A_log.double().exp() * torch.log1p((a.double() + dt_bias.double()).exp())
    beta = 1 / (1 + (-b.double()).exp())
    return (*heads, g, beta), torch.cat(history, 1)


@pytest.mark.parametrize(("T", "norm"), [(37, True), (2, False)])
def test_slot_conv_twin_is_the_head_by_head_composition(T, norm):
    slots, weight, taps, *gates = _conv_inputs(2, T, 8, torch.float64)
    weight = weight if norm else None
    got, state = glue.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps, *gates, output_final_state=True)
    want, want_state = _conv_by_head(slots, weight, 1e-6, taps, *gates)
    for i, (tensor, expected) in enumerate(zip(got, want, strict=True)):
        assert tensor.shape == ((2, T, 3, 8) if i < 3 else (2, T, 3)) and tensor.is_contiguous(), i
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(tensor, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-12, atol=1e-12)
    assert glue.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps, *gates)[1] is None


@needs_interpreter
@CONV_CASES
@pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning"
)  # eps 0: the padding's 1 / sqrt(0), dropped by design
def test_the_slot_conv_kernel_is_the_torch_twin(B, T, d, norm, eps, dtype, state):
    """slot_prep.slot_conv (Triton's interpreter) against glue.slot_conv: q, k, v, g, beta and the conv state."""
    from hhbench.layers import slot_prep

    slots, weight, taps, *gates = _conv_inputs(B, T, d, dtype)
    weight = weight if norm else None
    got, got_state = slot_prep.slot_conv(slots, GDN_SOURCES, weight, eps, taps, *gates, state)
    want, want_state = glue.slot_conv(slots, GDN_SOURCES, weight, eps, taps, *gates, state)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape == ((B, T, 3, d) if i < 3 else (B, T, 3)) and g.is_contiguous(), i
        assert g.dtype == w.dtype == (dtype if i < 3 else torch.promote_types(dtype, torch.float32)), i
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    if state:
        assert got_state.shape == (B, 3 * 3 * d, 4) and got_state.dtype == dtype
        torch.testing.assert_close(got_state, want_state, atol=tol, rtol=tol)
    else:
        assert got_state is None and want_state is None


@needs_interpreter
def test_slot_conv_refuses_what_its_kernel_cannot_read():
    """A strided head dim or gate input, conv taps or gate inputs of another shape, a source outside the slots (the
    kernel would read past them; the twin's gather raises the same error)."""
    from hhbench.layers import slot_prep

    slots, weight, taps, a, b, A_log, dt_bias = _conv_inputs(1, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="contiguous last dim"):
        slot_prep.slot_conv(torch.randn(1, 5, 7, 32)[..., ::2], GDN_SOURCES, weight, 1e-6, taps, a, b, A_log, dt_bias)
    with pytest.raises(ValueError, match="contiguous last dim"):
        slot_prep.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps, a, torch.randn(1, 5, 6)[..., ::2], A_log, dt_bias)
    with pytest.raises(ValueError, match=r"conv taps \[3 n d, K\] = \[144, K\], not \(143, 4\)"):
        slot_prep.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps[1:], a, b, A_log, dt_bias)
    with pytest.raises(ValueError, match=r"gate inputs a, b \[B, T, n\] = \[1, 5, 3\] and A_log, dt_bias \[3\]"):
        slot_prep.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps, a[..., :2], b, A_log, dt_bias)
    outside = ((0, 4, 7), (1, 3, 3), (2, 6, 6))
    for op in (slot_prep.slot_conv, glue.slot_conv):
        with pytest.raises(IndexError):
            op(slots, outside, weight, 1e-6, taps, a, b, A_log, dt_bias)


# head_norms: every head's output norm in a step without gradients
NORM_CASES = pytest.mark.parametrize(
    ("B", "T", "d", "gated", "fa", "dtype"),
    [
        (2, 37, 16, True, True, torch.float32),  # three blocks of 16 tokens a sequence, the last partial
        (3, 1, 12, True, True, torch.float64),  # a decode step; a head dim of 12 (masked to 16 lanes)
        (1, 9, 16, False, True, torch.float32),  # without output gate
        (2, 5, 16, True, False, torch.float64),  # a layer without FA heads
        (1, 9, 16, True, True, torch.float16),
    ],
)


def _norm_inputs(B, T, d, gated, fa, dtype):
    """GDN heads' outputs [B, T, 3, d] (contiguous, as the GDN kernels give them), their gate as a view of a wider
    GEMM output (strided over tokens), and two FA heads' outputs as SDPA gives them ([B, H, T, d] transposed)."""
    torch.manual_seed(0)
    o_la = torch.randn(B, T, 3, d, dtype=dtype)
    gate = (2 * torch.randn(B, T, 3 * d + 8, dtype=dtype))[..., : 3 * d].unflatten(-1, (3, d)) if gated else None
    o_fa = (3 * torch.randn(B, 2, T, d, dtype=dtype)).transpose(1, 2) if fa else None
    return o_la, gate, o_fa


@NORM_CASES
def test_head_norms_twin_is_each_heads_norm(B, T, d, gated, fa, dtype):
    """Each head's norm by hand, in o_proj's column order: the FA heads, then the GDN heads."""
    o_la, gate, o_fa = _norm_inputs(B, T, d, gated, fa, torch.float64)
    got = glue.head_norms(o_la, gate, o_fa, 1e-6)
    n_fa = 2 if fa else 0
    assert got.shape == (B, T, n_fa + 3, d)
    want = o_la / (o_la.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(got[:, :, n_fa:], want * (gate * torch.sigmoid(gate)) if gated else want)
    if fa:
        torch.testing.assert_close(got[:, :, :n_fa], o_fa / (o_fa.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())


@needs_interpreter
@NORM_CASES
def test_the_head_norms_kernel_is_the_torch_twin(B, T, d, gated, fa, dtype):
    """slot_prep.head_norms (Triton's interpreter) against glue.head_norms, from strided gates and FA outputs."""
    from hhbench.layers import slot_prep

    o_la, gate, o_fa = _norm_inputs(B, T, d, gated, fa, dtype)
    got, want = slot_prep.head_norms(o_la, gate, o_fa, 1e-6), glue.head_norms(o_la, gate, o_fa, 1e-6)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-3)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@needs_interpreter
def test_head_norms_refuses_what_its_kernel_cannot_read():
    from hhbench.layers import slot_prep

    o_la, gate, o_fa = _norm_inputs(1, 5, 16, True, True, torch.float32)
    with pytest.raises(ValueError, match="contiguous last dim"):
        slot_prep.head_norms(o_la, gate, torch.randn(1, 5, 2, 32)[..., ::2], 1e-6)
    with pytest.raises(ValueError, match="a gate of o_la's shape"):
        slot_prep.head_norms(o_la, gate[:, :, :2], o_fa, 1e-6)
    with pytest.raises(ValueError, match="a gate of o_la's shape"):
        slot_prep.head_norms(o_la, gate, o_fa[:, :4], 1e-6)


@needs_interpreter
@pytest.mark.parametrize("op", ["slot_conv", "slot_norm_rope", "slot_norm_rope_backward"])
def test_the_kernels_read_a_strided_norm_weight_as_the_twins_do(op):
    """Qwen3's q/k norm weight [2, d] as a view with other strides (its transpose's transpose: strides (1, 2)): the
    kernels index it as contiguous (row r at r d), so their launchers make it so; the twins index it as a tensor. Each
    gave the wrong q and k norms, silently."""
    from hhbench.layers import slot_prep

    slots, weight, taps, *gates = _conv_inputs(2, 5, 8, torch.float64)
    strided = weight.t().contiguous().t()
    assert torch.equal(strided, weight) and not strided.is_contiguous()
    plan = SlotPlan(sources=(0, 4, 3, 6), kinds=(0, 0, 1, 2), sizes=(2, 1, 1), n_rope=0)  # no RoPE: no tables
    if op == "slot_conv":
        got = slot_prep.slot_conv(slots, GDN_SOURCES, strided, 1e-6, taps, *gates)[0]
        want = glue.slot_conv(slots, GDN_SOURCES, weight, 1e-6, taps, *gates)[0]
    elif op == "slot_norm_rope":
        got = slot_prep.slot_norm_rope(slots, plan, strided, 1e-6, None, None)
        want = glue.slot_norm_rope(slots, plan, weight, 1e-6, None, None)
    else:
        grads = [torch.randn(2, 5, n, 8, dtype=torch.float64) for n in plan.sizes]
        buffers = [torch.zeros_like(slots) for _ in range(2)]
        got = (slot_prep.slot_norm_rope_backward(grads, slots, plan, strided, 1e-6, None, None, buffers[0]), buffers[0])
        want = (glue.slot_norm_rope_backward(grads, slots, plan, weight, 1e-6, None, None, buffers[1]), buffers[1])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("shape", [(1, 16), (2, 17)], ids=["one row", "wider"])
def test_the_kernels_refuse_a_norm_weight_of_another_shape(shape):
    """A q/k norm weight that is not [2, d]: the twins raise (its rows do not broadcast against the slots, or row 1 is
    missing); the kernels read row 1 at d.. whatever its shape: past its end for one row (out of bounds on a GPU),
    the wrong elements for a wider one."""
    from hhbench.layers import slot_prep

    slots, _, taps, *gates = _conv_inputs(1, 5, 16, torch.float32)
    with pytest.raises(ValueError, match=r"the q/k norm weight is \[2, d\] = \[2, 16\]"):
        slot_prep.slot_conv(slots, GDN_SOURCES, torch.ones(shape), 1e-6, taps, *gates)
    with pytest.raises(ValueError, match=r"the q/k norm weight is \[2, d\] = \[2, 16\]"):
        slot_prep.slot_norm_rope(slots, PLAN, torch.ones(shape), 1e-6, None, None)


@needs_interpreter
@pytest.mark.parametrize("sources", [((0, 4, 5), (1, 3, 3, 3), (2, 6, 6)), ((0, 4, 5), (1, 3), (2, 6, 6))])
def test_slot_conv_refuses_sources_of_uneven_lengths(sources):
    """sources = (q, k, v) must name the same n heads each: the kernel takes n from q and reads 3 n entries of the
    chained table. A longer k ran and read k's extra entry as the first v head's slot (the twin raises: its split does
    not match the taps); a shorter one read past the table's end (Triton's interpreter crashed the process)."""
    from hhbench.layers import slot_prep

    slots, weight, taps, *gates = _conv_inputs(1, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="sources"):
        slot_prep.slot_conv(slots, sources, weight, 1e-6, taps, *gates)


def test_the_glue_kernels_move_slots_by_16_bytes_a_thread_on_sm90():
    """slot_conv, head_norms, slot_norm_rope and its backward compiled for sm_90 as a bf16 Qwen3 layer launches them
    (ptxas without a GPU, tests/sm90_sass.py, in a fresh interpreter: Triton's interpreter cannot compile): no spills;
    head_norms, bound by memory, at most 64 registers a thread (4 of its 8-warp blocks an SM), slot_conv, which holds
    a window of 11 inputs a run in registers, at most 168 (6 of its 2-warp blocks an SM) and no barrier: its inputs'
    loads all in flight before the first norm waits on one (a norm weight or conv tap loaded as a [d] vector and
    broadcast took a layout conversion through shared memory, 2 barriers, at each of its 11 uses); and slots and
    gradients read and written by 16-byte vectors: no 2-byte global access but slot_conv's conv taps (strided by K)
    and its a and b. A slot moved element by element (as an unspecialized compile does) takes 8 accesses a thread
    where one ran."""
    sass = Path(__file__).with_name("sm90_sass.py")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(sass)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = json.loads(done.stdout)
    narrow = {name: sum(n for op, n in k["accesses"].items() if op.endswith((".U16", ".S16", ".U8", ".S8")))
              for name, k in kernels.items()}  # fmt: skip
    assert narrow.pop("slot_conv") <= 4 * 8 + 2 and not any(narrow.values()), kernels
    for name, k in kernels.items():
        assert k["local_bytes"] == 0, (name, k)
        assert k["accesses"].get("LDG.E.128") and k["accesses"].get("STG.E.128"), (name, k)
    assert kernels["slot_conv"]["registers"] <= 168 and kernels["head_norms"]["registers"] <= 64, kernels
    assert kernels["slot_conv"]["barriers"] == 0, kernels["slot_conv"]
