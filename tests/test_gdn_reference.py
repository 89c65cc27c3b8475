"""The pure-torch GDN forms agree with each other, and with the naive reference fla publishes."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hhbench.kernels.reference import gdn_chunk, gdn_recurrent, gdn_step


def gdn_inputs(B, T, H, K, V, dtype=torch.float64):
    q = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, dtype=dtype))
    beta = torch.rand(B, T, H, dtype=dtype)
    return q, k, v, g, beta


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T,C", [(64, 16), (100, 16), (37, 64), (1, 8)])
def test_chunk_equals_recurrence(T, C):
    q, k, v, g, beta = gdn_inputs(2, T, 3, 16, 8)
    h0 = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    o_chunk, s_chunk = gdn_chunk(q, k, v, g, beta, chunk_size=C, initial_state=h0, output_final_state=True)
    o_rec, s_rec = gdn_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o_chunk.shape == (2, T, 3, 8)
    assert rel(o_chunk, o_rec) < 1e-5
    assert rel(s_chunk, s_rec) < 1e-5


def test_recurrence_matches_the_rule_written_out():
    """One head, two tokens, the delta rule by hand."""
    q, k, v, g, beta = gdn_inputs(1, 2, 1, 4, 3)
    scale = 4**-0.5
    S = torch.zeros(4, 3, dtype=torch.float64)
    expected = []
    for t in range(2):
        kt, vt, qt = k[0, t, 0], v[0, t, 0], q[0, t, 0]
        S = S * g[0, t, 0].exp()
        S = S + beta[0, t, 0] * torch.outer(kt, vt - S.T @ kt)
        expected.append(S.T @ (qt * scale))
    o, _ = gdn_recurrent(q, k, v, g, beta)
    assert torch.allclose(o[0, :, 0], torch.stack(expected), atol=1e-12)


def test_decode_step_continues_a_prefill():
    q, k, v, g, beta = gdn_inputs(2, 33, 2, 8, 8)
    o_all, _ = gdn_recurrent(q, k, v, g, beta)
    _, state = gdn_chunk(
        q[:, :32], k[:, :32], v[:, :32], g[:, :32], beta[:, :32], chunk_size=16, output_final_state=True
    )
    o_last, _ = gdn_step(q[:, 32], k[:, 32], v[:, 32], g[:, 32], beta[:, 32], state)
    assert rel(o_last, o_all[:, 32]) < 1e-6


def test_bf16_inputs_return_bf16_close_to_fp64():
    ref = gdn_inputs(1, 70, 2, 16, 16)
    o_ref, _ = gdn_recurrent(*ref)
    o, _ = gdn_chunk(*(t.to(torch.bfloat16) for t in ref), chunk_size=32)
    assert o.dtype == torch.bfloat16
    assert rel(o, o_ref) < 2e-2


def load_fla_naive():
    """fla's naive GDN, loaded by path: importing fla.ops needs triton, which a CPU machine may lack."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "gated_delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gdn_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_matches_fla_naive_reference():
    naive = load_fla_naive()
    q, k, v, g, beta = gdn_inputs(1, 50, 2, 16, 16, torch.float32)
    o_fla, _ = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    o, _ = gdn_chunk(q, k, v, g, beta, chunk_size=16)
    assert rel(o, o_fla) < 1e-5
