"""The analytic GDN FLOPs are exact: torch's FlopCounterMode on the chunked reference counts the same."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hhbench.analytic.flops import depthwise_conv, gdn_chunk_forward_per_token, gdn_core, linear
from hhbench.kernels.reference import gdn_chunk, gdn_step
from hhbench.spec.axes import Pass
from tests.test_gdn_reference import gdn_inputs

SHAPES = [  # B, T, H, K, V, C: whole chunks, ragged tails, dk != dv, one token
    (1, 64, 1, 16, 16, 16),
    (2, 100, 3, 16, 8, 16),
    (1, 130, 2, 32, 64, 64),
    (1, 1, 1, 8, 8, 8),
]


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def grad_inputs(B, T, H, K, V):
    return [t.float().requires_grad_() for t in gdn_inputs(B, T, H, K, V)]


@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_forward_is_exact(B, T, H, K, V, C):
    inputs = gdn_inputs(B, T, H, K, V, torch.float32)
    flops = counted(lambda: gdn_chunk(*inputs, chunk_size=C))
    assert flops == gdn_core(Pass.PREFILL, B, H, T, K, V, C)
    padded = -(-T // C) * C
    assert flops == B * H * padded * (C * (6 * K + 4 * V) + 6 * K * V)


@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_backward_is_twice_forward_when_states_take_part(B, T, H, K, V, C):
    inputs = grad_inputs(B, T, H, K, V)
    h0 = torch.randn(B, H, K, V, requires_grad=True)
    o, state = gdn_chunk(*inputs, chunk_size=C, initial_state=h0, output_final_state=True)
    backward = counted(lambda: (o.sum() + state.sum()).backward())
    assert backward == 2 * gdn_core(Pass.PREFILL, B, H, T, K, V, C)
    assert backward + gdn_core(Pass.PREFILL, B, H, T, K, V, C) == gdn_core(Pass.TRAIN, B, H, T, K, V, C)


@pytest.mark.parametrize("B,T,H,K,V,C", SHAPES)
def test_backward_without_states_is_the_documented_bound(B, T, H, K, V, C):
    """No initial state and no final state in the loss: the two state products of the first chunk need one
    gradient each and the last state update none, 8*C*K*V per sequence and head fewer than 2x forward."""
    inputs = grad_inputs(B, T, H, K, V)
    o, _ = gdn_chunk(*inputs, chunk_size=C)
    backward = counted(lambda: o.sum().backward())
    assert backward == 2 * gdn_core(Pass.PREFILL, B, H, T, K, V, C) - 8 * B * H * C * K * V


@pytest.mark.parametrize("K,V", [(16, 16), (32, 8), (128, 128)])
def test_decode_step_is_exact(K, V):
    q, k, v, g, beta = (t[:, 0].float() for t in gdn_inputs(3, 1, 2, K, V))
    state = torch.randn(3, 2, K, V)
    assert counted(lambda: gdn_step(q, k, v, g, beta, state)) == gdn_core(Pass.DECODE, 3, 2, 999, K, V, 64)


def test_per_token_formula_at_the_kernel_default():
    # C=64, dk=dv=128: 64 * (6*128 + 4*128) + 6*128*128
    assert gdn_chunk_forward_per_token(128, 128, 64) == 180224


def test_linear_and_conv_match_flop_counter():
    x = torch.randn(2, 10, 24)
    layer = torch.nn.Linear(24, 40, bias=False)
    assert counted(lambda: layer(x)) == linear(Pass.PREFILL, 2, 10, 24, 40)
    x.requires_grad_()
    y = layer(x)
    assert counted(lambda: y.sum().backward()) + linear(Pass.PREFILL, 2, 10, 24, 40) == linear(
        Pass.TRAIN, 2, 10, 24, 40
    )
    conv_in = torch.randn(2, 24, 10)
    weight = torch.randn(24, 1, 4)
    causal = lambda: torch.nn.functional.conv1d(torch.nn.functional.pad(conv_in, (3, 0)), weight, groups=24)  # noqa: E731
    assert counted(causal) == depthwise_conv(Pass.PREFILL, 2, 10, 24, 4)
