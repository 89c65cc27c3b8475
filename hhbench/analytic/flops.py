"""Analytic FLOPs of each component, per pass. Pure functions of shapes; no torch.

Conventions (also in docs/methods.md):
- 2 FLOPs per multiply-add; the headline numbers count matmuls (and the short conv); softmax, norms, gates and
  other elementwise work are a separate estimate (`elementwise_*`), never part of a total.
- FA core, causal forward: 4*B*H*T^2*d/2 (FlashAttention's benchmark convention); backward 2.5x forward
  (it recomputes the scores); decode, one token over a cache of T: 4*B*H*T*d. GQA does not change it.
  A sliding window of W keys: the T^2/2 (query, key) pairs become T*W - W^2/2 beyond T = W (the first W queries
  attend causally, the rest to W keys each), and decode attends to min(T, W) keys.
- GDN core, chunkwise with chunk C, forward per token per head: C*(6*dk + 4*dv) + 6*dk*dv, T padded up to
  whole chunks. This is exact for the chunked reference in hhbench/kernels/reference.py (tests check it with
  torch's FlopCounterMode): per chunk, five C x C products (K_beta K^T, T V, T K_decay, Q K^T, A V_new) and
  three C x dk x dv products with the state (W S, Q S, K^T V_new). Backward is 2x forward: the two gradient
  products of every forward product, exact when the initial state takes gradients. Decode, one recurrent
  step: 6*dk*dv (read the state with k, with q, and the rank-1 update). The triangular solve of the chunk
  (C^3/3 multiply-adds per chunk) is not a matmul in the reference and sits in the elementwise estimate.
- Other linear layers: 2*in*out per token forward, 2x that for backward.
"""

from hhbench.spec.axes import Pass

FA_BACKWARD_FACTOR = 2.5
GDN_BACKWARD_FACTOR = 2.0
LINEAR_BACKWARD_FACTOR = 2.0


def tokens(pass_: Pass, context: int) -> int:
    """Tokens a pass pushes through the position-wise layers."""
    return 1 if pass_ is Pass.DECODE else context


def padded(context: int, chunk: int) -> int:
    """`context` rounded up to whole chunks of `chunk` tokens (the chunkwise GDN kernels pad the last one)."""
    return -(-context // chunk) * chunk


def attended(context: int, window: int = 0) -> int:
    """Keys one query attends to at the end of `context` tokens: all of them, or the sliding window's W."""
    return min(context, window) if window else context


def score_pairs(context: int, window: int = 0) -> float:
    """(query, key) pairs of causal attention over `context` tokens, T^2/2 by the FlashAttention convention;
    with a sliding window of W keys, W^2/2 for the first W queries and W for each of the T - W after them."""
    if not window or context <= window:
        return context * context / 2
    return context * window - window * window / 2


def fa_core(pass_: Pass, batch: int, heads: float, context: int, head_dim: int, window: int = 0) -> float:
    """FA core FLOPs of `heads` heads; `window` > 0: a sliding window of that many keys."""
    if pass_ is Pass.DECODE:
        return 4.0 * batch * heads * attended(context, window) * head_dim
    forward = 4.0 * batch * heads * score_pairs(context, window) * head_dim
    return forward * (1 + FA_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def gdn_chunk_forward_per_token(dk: int, dv: int, chunk: int) -> float:
    """Matmul FLOPs per token per head of the chunkwise GDN forward: C*(6*dk + 4*dv) + 6*dk*dv (module
    docstring; exact for hhbench.kernels.reference's chunked form)."""
    return chunk * (6 * dk + 4 * dv) + 6 * dk * dv


def gdn_core(pass_: Pass, batch: int, heads: float, context: int, dk: int, dv: int, chunk: int) -> float:
    """GDN core FLOPs of `heads` heads: chunkwise over `context` padded to `chunk`, backward 2x forward;
    decode is one recurrent step over the dk x dv state, 6*dk*dv per head (Gated DeltaNet, Yang et al. 2024)."""
    if pass_ is Pass.DECODE:
        return 6.0 * batch * heads * dk * dv
    forward = float(batch * heads * padded(context, chunk) * gdn_chunk_forward_per_token(dk, dv, chunk))
    return forward * (1 + GDN_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def linear(pass_: Pass, batch: int, context: int, d_in: float, d_out: float) -> float:
    """FLOPs of a linear layer d_in -> d_out over the pass's tokens: 2*d_in*d_out per token, backward 2x."""
    forward = 2.0 * batch * tokens(pass_, context) * d_in * d_out
    return forward * (1 + LINEAR_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def depthwise_conv(pass_: Pass, batch: int, context: int, channels: float, kernel: int) -> float:
    """Causal depthwise conv: one multiply-add per tap, per channel, per token."""
    return linear(pass_, batch, context, channels, kernel)


# Elementwise estimates (FLOPs per element); rough by nature, never mixed into the matmul totals.
RMSNORM_PER_ELEMENT = 4  # square, sum, scale, weight
SOFTMAX_PER_SCORE = 5  # max, subtract, exp, sum, divide
SWIGLU_PER_ELEMENT = 5  # sigmoid (3), multiply by x, multiply by the up branch
GDN_GATES_PER_HEAD = 12  # decay gate softplus and exp, beta sigmoid
L2NORM_PER_ELEMENT = 3


def elementwise_fa(pass_: Pass, batch: int, heads: float, context: int, window: int = 0) -> float:
    """Softmax estimate of `heads` FA heads: SOFTMAX_PER_SCORE per (query, key) score; never part of a total."""
    scores = attended(context, window) if pass_ is Pass.DECODE else score_pairs(context, window)
    forward = SOFTMAX_PER_SCORE * batch * heads * scores
    return forward * (1 + FA_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def elementwise_gdn(pass_: Pass, batch: int, heads: float, context: int, dk: int, dv: int, chunk: int) -> float:
    """Gates, q/k L2 norms, output gate, state decay, and in chunk mode the decay masks and the triangular
    solve (C^3/3 multiply-adds per chunk)."""
    per_token = GDN_GATES_PER_HEAD + L2NORM_PER_ELEMENT * 2 * dk + SWIGLU_PER_ELEMENT * dv
    if pass_ is Pass.DECODE:
        return batch * heads * (per_token + 2 * dk * dv)
    n = padded(context, chunk)
    per_token += chunk + 2 * chunk * chunk / 3 + dk * dv / chunk
    forward = batch * heads * n * per_token
    return forward * (1 + GDN_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def elementwise_norm(pass_: Pass, batch: int, context: int, elements_per_token: float) -> float:
    """RMSNorm estimate: RMSNORM_PER_ELEMENT per normalized element, `elements_per_token` per token."""
    forward = RMSNORM_PER_ELEMENT * batch * tokens(pass_, context) * elements_per_token
    return forward * (1 + LINEAR_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward


def elementwise_swiglu(pass_: Pass, batch: int, context: int, width: int) -> float:
    """SwiGLU activation estimate: SWIGLU_PER_ELEMENT per element of the MLP's `width` per token."""
    forward = SWIGLU_PER_ELEMENT * batch * tokens(pass_, context) * width
    return forward * (1 + LINEAR_BACKWARD_FACTOR) if pass_ is Pass.TRAIN else forward
