"""Every backend that runs on the CPU against an independent reference; the registry's contract."""

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hhbench.errors import Unsupported, UserError
from hhbench.kernels import gdn, registry
from hhbench.kernels.fa import Sdpa, expand_kv
from hhbench.kernels.reference import gdn_recurrent
from hhbench.kernels.split_kv import MIN_SEGMENT, n_segments, split_kv_decode
from tests.test_gdn_reference import gdn_inputs, rel


def softmax_attention(q, k, v, causal):
    """[B, T, H, d] with K/V already one per query head, written out in fp64."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_math_prefill_and_decode_with_gqa(kv_heads):
    backend = registry.get("sdpa-math", registry.FA)
    q = torch.randn(2, 33, 4, 16)
    k, v = torch.randn(2, 33, kv_heads, 16), torch.randn(2, 33, kv_heads, 16)
    expected = softmax_attention(q, expand_kv(k, 4), expand_kv(v, 4), causal=True)
    assert rel(backend.prefill(q, k, v), expected) < 1e-6
    step = backend.decode(q[:, -1:], k, v)  # the last token sees the whole cache: causal prefill's last row
    assert rel(step, expected[:, -1:]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("name", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math"])
def test_a_one_token_prefill_is_attention_over_its_own_key(name, kv_heads, dtype):
    """cuDNN refuses a one-token causal call; SDPA's backends answer it with the math kernel (which runs here, on
    the CPU, for the CUDA-only ones too): the value, exactly, in a new tensor, with q and k in the autograd graph
    (their gradients zero, not missing: a training step at context 1 differentiates them)."""
    backend = registry.get(name, registry.FA)
    q = torch.randn(2, 1, 4, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 1, kv_heads, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    out = backend.prefill(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape and out.data_ptr() != v.data_ptr()
    assert torch.equal(out, expand_kv(v, 4))
    grad_q, grad_k, grad_v = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert not grad_q.any() and not grad_k.any()
    (expected,) = torch.autograd.grad(expand_kv(v, 4).float().square().sum(), v)
    assert rel(grad_v, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_backends_without_native_gqa_expand_kv():
    class Expanding(Sdpa):
        kernel = torch.nn.attention.SDPBackend.MATH
        native_gqa = False

    backend = Expanding("x", registry.FA, ("cpu",), "")
    q, k, v = torch.randn(1, 20, 6, 8), torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8)
    assert rel(backend.prefill(q, k, v), registry.get("sdpa-math", registry.FA).prefill(q, k, v)) < 1e-6


@pytest.mark.parametrize("segments", [1, 2, 7, 16])
@pytest.mark.parametrize(("batch", "length", "kv_heads"), [(1, 1000, 4), (2, 333, 2), (3, 64, 1)])
def test_split_kv_decode_equals_attention_over_the_whole_cache(segments, batch, length, kv_heads):
    """Segments of 1000/7 leave 6 tokens over, 333/16 leave 13; 64/16 are 4 tokens each; GQA groups of 1-4."""
    q = torch.randn(batch, 1, 4, 32)
    k, v = torch.randn(batch, length, kv_heads, 32), torch.randn(batch, length, kv_heads, 32)
    expected = softmax_attention(q, expand_kv(k, 4), expand_kv(v, 4), causal=False)
    assert rel(split_kv_decode(q, k, v, segments), expected) < 1e-5
    assert rel(split_kv_decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), segments), expected) < 2e-2


def test_split_kv_segments_fill_the_target_and_keep_a_minimum_length():
    assert n_segments(128 * 1024, pairs=4, target_blocks=264) == 66  # 4 FA heads at batch 1 on 132 SMs
    assert n_segments(128 * 1024, pairs=64, target_blocks=264) == 5
    assert n_segments(128 * 1024, pairs=512, target_blocks=264) == 1  # enough blocks already
    assert n_segments(3 * MIN_SEGMENT + 5, pairs=1, target_blocks=264) == 3
    assert n_segments(100, pairs=1, target_blocks=264) == 1
    backend = registry.get("sdpa-split", registry.FA)
    assert backend.unsupported("prefill") and backend.unsupported("decode") is None
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 4096, 2, 16), torch.randn(1, 4096, 2, 16)
    assert rel(backend.decode(q, k, v), registry.get("sdpa-math", registry.FA).decode(q, k, v)) < 1e-5


@pytest.mark.parametrize("name", ["torch-chunk", "torch-recurrent"])
def test_torch_gdn_backends_against_the_recurrence_and_step(name):
    backend = registry.get(name, registry.GDN)
    q, k, v, g, beta = gdn_inputs(2, 45, 3, 16, 16)
    expected, final = gdn_recurrent(q, k, v, g, beta, output_final_state=True)
    o, state = backend.prefill(q, k, v, g, beta, output_final_state=True, chunk_size=16)
    assert rel(o, expected) < 1e-6 and rel(state, final) < 1e-6
    q2, k2, v2, g2, b2 = (t[:, 0] for t in gdn_inputs(2, 1, 3, 16, 16))
    o_step, _ = backend.step(q2, k2, v2, g2, b2, state)
    o_next, _ = gdn_recurrent(q2[:, None], k2[:, None], v2[:, None], g2[:, None], b2[:, None], initial_state=final)
    assert rel(o_step, o_next[:, 0]) < 1e-6


def raw_gate_case(B=2, H=3, d=16, dtype=torch.float64):
    """One step's q, k, v [B, H, d], raw gate inputs a, b [B, H], state [B, H, d, d] and the gate's A_log, dt_bias
    [H] (as GDN's init draws them: A in [1, 16), dt_bias = softplus^-1(dt) for dt in (e^-5, 1])."""
    q, k, v, _, _ = (t[:, 0] for t in gdn_inputs(B, 1, H, d, d, dtype))
    a, b = torch.randn(B, H, dtype=dtype) * 2, torch.randn(B, H, dtype=dtype) * 2
    state = torch.randn(B, H, d, d, dtype=dtype) * 0.1
    A_log, dt_bias = torch.rand(H).mul(15).add(1).log(), torch.rand(H).mul(-5).exp().expm1().log()
    return q, k, v, a, b, state, A_log.to(dtype), dt_bias.to(dtype)


def gates_written_out(a, b, A_log, dt_bias):
    """Log decay -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b), in fp64."""
    a, b, A_log, dt_bias = (t.double() for t in (a, b, A_log, dt_bias))
    return -A_log.exp() * torch.log1p((a + dt_bias).exp()), torch.sigmoid(b)


@pytest.mark.parametrize("gate, sigmoid", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("name", ["torch-chunk", "torch-recurrent"])
def test_a_torch_gdn_step_takes_raw_gates_as_flas_kernel_does(name, gate, sigmoid):
    """fla's options (Backend.step): the decay gate from the raw a with A_log and dt_bias, beta's sigmoid from the
    raw b, each alone or both: the step equals the step with the gates precomputed (written out here)."""
    backend = registry.get(name, registry.GDN)
    q, k, v, a, b, state, A_log, dt_bias = raw_gate_case()
    g, beta = gates_written_out(a, b, A_log, dt_bias)
    o_raw, state_raw = backend.step(
        q, k, v, a if gate else g, b if sigmoid else beta, state, use_gate_in_kernel=gate,
        A_log=A_log if gate else None, dt_bias=dt_bias if gate else None, use_beta_sigmoid_in_kernel=sigmoid,
    )  # fmt: skip
    o, expected_state = backend.step(q, k, v, g, beta, state)
    assert rel(o_raw, o) < 1e-12 and rel(state_raw, expected_state) < 1e-12


def fla_fused_recurrent_stand_in(
    q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None,
    use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, **kwargs,
):  # fmt: skip
    """fla 0.6's fused_recurrent_gated_delta_rule as its signature reads (fla/ops/gated_delta_rule/fused_recurrent.py:
    gk and gv between g and beta; beta None means ones), one token computed by the torch reference's step."""
    assert gk is None and gv is None, "the stand-in has no per-key or per-value gates (hhbench passes none)"
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    o, state = registry.get("torch-recurrent", registry.GDN).step(
        *(t[:, 0] for t in (q, k, v, g, beta)), initial_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
    )  # fmt: skip
    return o[:, None], state


@pytest.mark.parametrize("raw", [False, True])
def test_fla_recurrent_step_hands_g_and_beta_to_fla_by_name(monkeypatch, raw):
    """fla 0.6 put gk and gv between g and beta: a positional beta became gk, and every fla-recurrent decode on the
    H200 was off by a relative error of 1-2 (the default suite's kernel-scope decode rows, 'incorrect'). Against a
    stand-in with fla 0.6's signature, the step equals the torch reference's, gates precomputed or raw."""
    fake = types.ModuleType("fla.ops.gated_delta_rule")
    fake.fused_recurrent_gated_delta_rule = fla_fused_recurrent_stand_in
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)
    q, k, v, a, b, state, A_log, dt_bias = raw_gate_case()
    g, beta = gates_written_out(a, b, A_log, dt_bias)
    options = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
    o, new_state = registry.get("fla-recurrent", registry.GDN).step(
        q, k, v, *((a, b) if raw else (g, beta)), state, **(options if raw else {})
    )
    o_ref, state_ref = registry.get("torch-recurrent", registry.GDN).step(q, k, v, g, beta, state)
    assert rel(o, o_ref) < 1e-12 and rel(new_state, state_ref) < 1e-12


def spy_on_fla(monkeypatch, module_name: str, function_name: str, reads: tuple[str, ...] = ()):
    """Replace fla's `function_name` (an attribute of `module_name`, where hhbench imports it from) by a spy that binds
    each call to the installed fla's own signature and keeps its arguments by parameter name, returning a dummy (o, None).
    A positional argument in the wrong slot then shows under the slot's name, and a keyword fla does not take, which
    fla's **kwargs would swallow, fails here; `reads` names the keywords fla's body takes out of its **kwargs."""
    module = importlib.import_module(module_name)
    signature = inspect.signature(getattr(module, function_name))
    swallowing = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    calls = []

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        for name in swallowing:
            bound.update(bound.pop(name, {}))
        swallowed = set(bound) - set(signature.parameters) - set(reads)
        assert not swallowed, f"{function_name} would swallow {swallowed}"
        calls.append({**bound, "FLA_FLASH_QLA": os.environ.get(gdn.FLASH_QLA_SWITCH)})
        return torch.zeros(1, 1), None

    monkeypatch.setattr(module, function_name, spy)
    return calls


def test_every_call_into_fla_fits_the_installed_flas_signature(monkeypatch):
    """Each call hhbench makes into fla (the GDN backends' and the fused layer's glue), bound to the installed fla's
    signatures: each argument in the slot meant for it (fla 0.6 put gk and gv between g and beta, which a positional
    beta fell into), none swallowed by fla's **kwargs, fla-chunk pinned to fla's own path."""
    pytest.importorskip("fla.ops.gated_delta_rule", exc_type=ImportError)
    from hhbench.layers import glue

    fla_gdn = "fla.ops.gated_delta_rule"
    q, k, v, a, b, state, A_log, dt_bias = raw_gate_case()
    g, beta = gates_written_out(a, b, A_log, dt_bias)
    sequence = [t.unsqueeze(1) for t in (q, k, v, g, beta)]  # [B, T=1, H, *]
    same = torch.equal

    recurrent = spy_on_fla(monkeypatch, fla_gdn, "fused_recurrent_gated_delta_rule")
    fla_recurrent = registry.get("fla-recurrent", registry.GDN)
    fla_recurrent.step(q, k, v, a, b, state, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                       dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)  # fmt: skip
    fla_recurrent.prefill(*sequence, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    step, prefill = recurrent
    assert "gk" not in step and "gv" not in step and same(step["g"][:, 0], a) and same(step["beta"][:, 0], b)
    assert all(same(step[name][:, 0], t) for name, t in zip("qkv", (q, k, v), strict=True))
    assert step["initial_state"] is state and step["output_final_state"] and step["use_qk_l2norm_in_kernel"]
    assert step["use_gate_in_kernel"] and step["A_log"] is A_log and step["dt_bias"] is dt_bias
    assert step["use_beta_sigmoid_in_kernel"] and "scale" not in step and "state_v_first" not in step
    assert all(prefill[name] is t for name, t in zip(("q", "k", "v", "g", "beta"), sequence, strict=True))
    assert "gk" not in prefill and "gv" not in prefill
    assert prefill["initial_state"] is state and prefill["output_final_state"] and prefill["use_qk_l2norm_in_kernel"]

    # fla 0.6 takes its chunk size (16, 32 or 64) out of **kwargs, which fla-chunk hands on
    chunk = spy_on_fla(monkeypatch, fla_gdn, "chunk_gated_delta_rule", reads=("chunk_size",))
    registry.get("fla-chunk", registry.GDN).prefill(*sequence, state, True, 32, use_qk_l2norm_in_kernel=True)
    (call,) = chunk
    assert all(call[name] is t for name, t in zip(("q", "k", "v", "g", "beta"), sequence, strict=True))
    assert "scale" not in call and call["chunk_size"] == 32
    assert call["initial_state"] is state and call["output_final_state"] and call["use_qk_l2norm_in_kernel"]
    assert call["FLA_FLASH_QLA"] == "0" and "state_v_first" not in call

    conv = spy_on_fla(monkeypatch, "fla.modules.causal_conv1d", "causal_conv1d")
    update = spy_on_fla(monkeypatch, "fla.modules.causal_conv1d", "causal_conv1d_update")
    gate = spy_on_fla(monkeypatch, f"{fla_gdn}.gate", "fused_gdn_gate")
    norm = spy_on_fla(monkeypatch, "fla.modules.norm.layernorm", "rms_norm")
    norm_gated = spy_on_fla(monkeypatch, "fla.modules.norm.fused_norm_gate", "rms_norm_gated")
    glue.fla_ops.cache_clear()  # it holds the functions fla had when first asked
    try:
        ops = glue.fla_ops()
        x, weight = torch.randn(2, 5, 6), torch.randn(6, 4)
        # as the fused layer calls them (hydrahead.py): positions and names of the GlueOps fields' signatures
        ops.conv(x, weight, state, True), ops.conv_update(x[:, :1], state, weight), ops.gate(a, A_log, dt_bias)
        ops.norm(x, 1e-6), ops.norm_gated(x, v, 1e-6)
    finally:
        glue.fla_ops.cache_clear()
    ((conv,), (update,), (gate,), (norm,), (norm_gated,)) = conv, update, gate, norm, norm_gated
    assert conv["x"] is x and conv["weight"] is weight and conv["initial_state"] is state
    assert conv["output_final_state"] and conv["activation"] == "silu" and "bias" not in conv
    assert update["cache"] is state and update["weight"] is weight and update["activation"] == "silu"
    assert gate["g"] is a and gate["A_log"] is A_log and gate["dt_bias"] is dt_bias
    assert norm["x"] is x and norm["weight"] is norm["bias"] is None and norm["eps"] == 1e-6
    assert norm_gated["x"] is x and norm_gated["g"] is v and norm_gated["weight"] is norm_gated["bias"] is None
    assert norm_gated["activation"] == "swish" and norm_gated["eps"] == 1e-6


def test_registry_contract():
    fa_names, gdn_names = registry.names(registry.FA), registry.names(registry.GDN)
    assert {"sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flash-attn", "flex"} <= set(fa_names)
    assert {"flash-qla", "fla-chunk", "fla-recurrent", "torch-chunk", "torch-recurrent"} <= set(gdn_names)
    assert registry.resolve("auto", registry.FA, "cpu", "prefill").name == "sdpa-math"
    assert registry.resolve("auto", registry.GDN, "cpu", "decode").name == "torch-recurrent"
    assert registry.resolve("auto", registry.GDN, "cuda", "train").name == "fla-chunk"
    assert registry.resolve("auto", registry.FA, "cuda", "decode").name == "triton-split"
    assert (
        registry.get("triton-split", registry.FA).unsupported("prefill")
        == "triton-split does not implement the prefill pass"
    )
    assert "runs on cuda" in registry.get("sdpa-cudnn", registry.FA).unavailable("cpu")
    assert registry.get("sdpa-math", registry.FA).unavailable("cpu") is None
    assert registry.get("flex", registry.FA).unsupported("decode") == "flex does not implement the decode pass"
    with pytest.raises(UserError, match="unknown GDN backend 'sdpa-math'"):
        registry.get("sdpa-math", registry.GDN)


def test_gpu_only_backends_say_why_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name in ("fla-chunk", "fla-recurrent"):
        assert registry.get(name, registry.GDN).unavailable("cuda") == "no CUDA device"


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'fla-chunk' is registered twice"):
        registry.register(registry.GDN, "fla-chunk", ("cuda",), "again")(registry.Backend)


def test_fla_recurrent_refuses_training():
    """fla 0.6's fused recurrent kernel has no backward (FusedRecurrentFunction.backward raises NotImplementedError):
    a training point on fla-recurrent is unsupported before it runs, not an error after."""
    backend = registry.get("fla-recurrent", registry.GDN)
    assert backend.unsupported("train") == "fla-recurrent does not implement the train pass"
    assert backend.unsupported("prefill") is None and backend.unsupported("decode") is None


def test_a_command_refuses_a_named_backend_that_cannot_run_its_pass(monkeypatch):
    """check_name given a pass (distill trains): a backend that does not implement it, takes another dtype or head dim,
    or is unavailable here is one line (UserError), as an unknown name is; auto and a backend that runs pass."""
    refusals = {
        ("sdpa-split", registry.FA, "cpu", 128): "sdpa-split does not implement the train pass",
        ("flash-qla", registry.GDN, "cuda", 64): "flash-qla takes head dims 128, not 64",
    }
    monkeypatch.setattr(registry.Backend, "unavailable", lambda self, device: None)
    for (name, kind, device, head_dim), reason in refusals.items():
        registry.check_name(name, kind, device)  # the name alone passes
        with pytest.raises(UserError, match=f"backend {name} cannot run the train pass here: {reason}"):
            registry.check_name(name, kind, device, "train", "bf16", head_dim)
    registry.check_name("flash-qla", registry.GDN, "cuda", "train", "bf16", 128)
    registry.check_name("auto", registry.GDN, "cuda", "train", "fp32", 64)
    monkeypatch.setattr(registry.Backend, "unavailable", lambda self, device: "no flash_qla")
    with pytest.raises(UserError, match="no flash_qla"):
        registry.check_name("flash-qla", registry.GDN, "cuda", "train", "bf16", 128)


def test_flash_qla_refuses_what_it_cannot_run():
    backend = registry.get("flash-qla", registry.GDN)
    assert backend.unsupported("decode") == "flash-qla does not implement the decode pass"
    assert backend.unsupported("prefill", "fp32", 128) == "flash-qla takes bf16, fp16, not fp32"
    assert backend.unsupported("train", "bf16", 64) == "flash-qla takes head dims 128, not 64"
    assert backend.unsupported("train", "bf16", 128) is None


def test_flash_qla_is_unavailable_where_it_does_not_import(monkeypatch):
    if importlib.util.find_spec("flash_qla") is not None:
        pytest.skip("flash_qla imports here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = registry.get("flash-qla", registry.GDN).unavailable("cuda")
    assert reason == "ModuleNotFoundError: No module named 'flash_qla'"


@pytest.fixture
def gpu_backends(monkeypatch):
    """A machine where every backend probes fine, except those named in the returned set."""
    missing: set[str] = set()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(registry, "_probe", lambda name: "ImportError: absent" if name in missing else None)
    return missing


def test_auto_takes_the_first_candidate_that_fits_the_point(gpu_backends):
    def auto(pass_="prefill", dtype="bf16", head_dim=128):
        return registry.resolve("auto", registry.GDN, "cuda", pass_, dtype, head_dim).name

    assert auto() == auto("train") == "flash-qla"
    assert auto(dtype="fp32") == auto(head_dim=64) == "fla-chunk"  # FlashQLA takes bf16/fp16 and heads of 128
    assert auto("decode") == "fla-recurrent"
    # an axis the caller does not say passes over the candidates restricted on it (a layer says its dtype only)
    assert registry.resolve("auto", registry.GDN, "cuda", "prefill").name == "fla-chunk"
    assert registry.resolve("auto", registry.GDN, "cuda", "prefill", "bf16").name == "fla-chunk"
    fa = {"bf16": "sdpa-cudnn", "fp16": "sdpa-cudnn", "fp32": "sdpa-efficient", None: "sdpa-efficient"}
    for dtype, name in fa.items():  # cuDNN attention takes bf16 and fp16 only (torch's sdp_utils.cpp)
        assert registry.resolve("auto", registry.FA, "cuda", "train", dtype).name == name
    assert (
        registry.get("sdpa-cudnn", registry.FA).unsupported("prefill", "fp32")
        == "sdpa-cudnn takes bf16, fp16, not fp32"
    )
    assert registry.auto_choices("cuda")["gdn/train"] == ["flash-qla", "fla-chunk"]
    gpu_backends.add("flash-qla")
    assert auto() == "fla-chunk"
    assert registry.auto_choices("cuda")["gdn/train"] == ["fla-chunk"]
    assert registry.auto_choices("cpu") == {
        "fa/prefill": ["sdpa-math"], "fa/train": ["sdpa-math"], "fa/decode": ["sdpa-math"],
        "gdn/prefill": ["torch-chunk"], "gdn/train": ["torch-chunk"], "gdn/decode": ["torch-recurrent"],
    }  # fmt: skip


def test_fla_chunk_pins_fla_s_own_triton_path(monkeypatch):
    """fla 0.6 dispatches chunk_gated_delta_rule to FlashQLA unless FLA_FLASH_QLA=0, which it reads per call:
    fla-chunk's call sees "0", and the variable is as it was after the call, set or not."""
    seen = []
    fake = types.ModuleType("fla.ops.gated_delta_rule")
    fake.chunk_gated_delta_rule = lambda *args, **kwargs: seen.append(os.environ.get(gdn.FLASH_QLA_SWITCH))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)
    backend = registry.get("fla-chunk", registry.GDN)
    monkeypatch.delenv(gdn.FLASH_QLA_SWITCH, raising=False)
    backend.prefill(*gdn_inputs(1, 8, 1, 4, 4))
    assert seen == ["0"] and gdn.FLASH_QLA_SWITCH not in os.environ
    monkeypatch.setenv(gdn.FLASH_QLA_SWITCH, "1")
    backend.prefill(*gdn_inputs(1, 8, 1, 4, 4))
    assert seen == ["0", "0"] and os.environ[gdn.FLASH_QLA_SWITCH] == "1"
    with pytest.raises(Unsupported, match="chunks of 16, 32, 64 tokens"):
        backend.prefill(*gdn_inputs(1, 8, 1, 4, 4), chunk_size=128)


@pytest.mark.parametrize("tilelang", [True, False])
def test_fla_chunk_refuses_to_train_at_16_token_chunks_where_fla_sends_the_backward_to_tilelang(monkeypatch, tilelang):
    """TileLang does not build fla's chunk_bwd_dqkwg for 16-token chunks (the H200's TVM error, no warp partition):
    where fla would send the backward there, fla-chunk refuses a chunk-16 call that gradients flow through, before fla
    runs, and the row gets the whole reason as `unsupported`; without gradients, at 32, or without TileLang it runs."""
    from hhbench.rows import schema
    from hhbench.runner.point import _classify

    calls = []
    fake = types.ModuleType("fla.ops.gated_delta_rule")
    fake.chunk_gated_delta_rule = lambda *args, **kwargs: calls.append(kwargs["chunk_size"])
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)
    monkeypatch.setattr(gdn, "fla_tilelang_backward", lambda: tilelang)
    backend = registry.get("fla-chunk", registry.GDN)
    leaves = [t.requires_grad_() for t in gdn_inputs(1, 8, 1, 4, 4)]
    with torch.no_grad():
        backend.prefill(*leaves, chunk_size=16)
    backend.prefill(*(t.detach() for t in leaves), chunk_size=16)
    backend.prefill(*leaves, chunk_size=32)
    assert calls == [16, 16, 32]
    if not tilelang:
        backend.prefill(*leaves, chunk_size=16)
        assert calls == [16, 16, 32, 16]
        return
    with pytest.raises(Unsupported, match="16-token chunks") as refused:
        backend.prefill(*leaves, chunk_size=16)
    assert "fla issue #640" in str(refused.value) and calls == [16, 16, 32]
    assert _classify(refused.value) == (schema.UNSUPPORTED, gdn.TILELANG_BACKWARD_REFUSAL)


def test_flash_qla_takes_its_q_k_l2_norm_from_fla(monkeypatch):
    """With use_qk_l2norm_in_kernel, flash-qla normalizes q and k by fla's L2 norm (gdn.fla_l2norm, here its torch
    form) and calls FlashQLA with normalized inputs and its own norm off; without it, q and k go as they are. The
    kernel (a stand-in module `flash_qla` recording its call) gets v, g, beta and the state options unchanged."""
    calls = []

    def chunk_gated_delta_rule(q, k, v, g, beta, **options):
        calls.append((q, k, v, g, beta, options))
        return v, None

    monkeypatch.setitem(sys.modules, "flash_qla", types.SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule))
    monkeypatch.setattr(gdn, "fla_l2norm", lambda x: x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6))
    q, k, v, g, beta = gdn_inputs(1, 9, 2, 128, 128, dtype=torch.float32)
    backend = registry.get("flash-qla", registry.GDN)
    backend.prefill(q * 3, k * 5, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    backend.prefill(q * 3, k * 5, v, g, beta)
    (nq, nk, *rest, normed), (rq, rk, *_, raw) = calls
    assert torch.allclose(nq.norm(dim=-1), torch.ones(1, 9, 2)) and torch.allclose(nk.norm(dim=-1), torch.ones(1, 9, 2))
    assert torch.allclose(nq, F.normalize(q, dim=-1), atol=1e-6) and torch.allclose(
        nk, F.normalize(k, dim=-1), atol=1e-6
    )
    assert all(a is b for a, b in zip(rest, (v, g, beta), strict=True))
    assert normed == {"initial_state": None, "output_final_state": True, "use_qk_l2norm_in_kernel": False}
    assert torch.equal(rq, q * 3) and torch.equal(rk, k * 5) and raw["use_qk_l2norm_in_kernel"] is False


def test_rows_name_the_gdn_implementation(monkeypatch):
    chunk, qla = registry.get("fla-chunk", registry.GDN), registry.get("flash-qla", registry.GDN)
    monkeypatch.setattr(gdn, "fla_tilelang_backward", lambda: True)
    assert chunk.implementation("prefill").endswith("Triton chunk (FLA_FLASH_QLA=0)")
    assert chunk.implementation("train").endswith("(FLA_FLASH_QLA=0), backward chunk_bwd_dqkwg in TileLang")
    monkeypatch.setattr(gdn, "fla_tilelang_backward", lambda: False)
    assert chunk.implementation("train").endswith("(FLA_FLASH_QLA=0)")
    assert qla.implementation("prefill").startswith("flash_qla ") and "L2 norm" not in qla.implementation("prefill")
    assert qla.implementation("train").endswith("q/k L2 norm by fla's kernel")
    assert (
        registry.get("torch-chunk", registry.GDN).implementation("train")
        == "pure-torch chunked reference (hhbench.kernels.reference)"
    )


def test_registries_refuse_a_name_twice():
    from hhbench.models.variants import HEAD_CHOICES, head_choice

    registry.names(registry.FA)  # the backends' modules are loaded
    before = dict(registry.REGISTRY)
    again = type("Again", (registry.Backend,), {"prefill": lambda self, q, k, v: q, "decode": lambda self, *a: a[0]})
    with pytest.raises(ValueError, match="backend 'sdpa-math' is registered twice"):
        registry.register(registry.FA, "sdpa-math", ("cpu",), "a second sdpa-math")(again)
    with pytest.raises(ValueError, match="head choice 'uniform' is registered twice"):
        head_choice("uniform")(lambda variant, shape, path: None)
    assert registry.REGISTRY == before and HEAD_CHOICES["uniform"].__name__ == "_uniform"


def test_a_backend_defines_the_method_of_every_pass_it_declares():
    prefill_only = type("PrefillOnly", (registry.Backend,), {"prefill": lambda self, *a, **o: a[0]})
    with pytest.raises(ValueError, match="declares the decode pass and defines no step"):
        registry.register(registry.GDN, "prefill-only", ("cpu",), "no recurrent step")(prefill_only)
    assert "prefill-only" not in registry.REGISTRY
    backend = registry.get("sdpa-split", registry.FA)  # decode only: prefill is Backend's, which refuses
    with pytest.raises(NotImplementedError, match="sdpa-split does not implement prefill"):
        backend.prefill(None, None, None)
