"""Every backend that runs on the CPU against an independent reference; the registry's contract."""

import math

import pytest
import torch

from hhbench.errors import UserError
from hhbench.kernels import registry
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


def test_registry_contract():
    fa_names, gdn_names = registry.names(registry.FA), registry.names(registry.GDN)
    assert {"sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flash-attn", "flex"} <= set(fa_names)
    assert {"fla-chunk", "fla-recurrent", "torch-chunk", "torch-recurrent"} <= set(gdn_names)
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
