"""Pure-torch Gated DeltaNet: the chunked form (the `torch-chunk` backend), the recurrent form (the
`torch-recurrent` backend, and the oracle for everything else) and one decode step.

Layout as in fla: q, k [B, T, H, K]; v [B, T, H, V]; g (log decay, <= 0) and beta [B, T, H]; state [B, H, K, V].
Computation is in fp32 (fp64 for fp64 inputs); outputs return in v's dtype, states in the compute dtype.

The recurrence, per head, with S the K x V state:
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = S_t^T (scale q_t)

The chunked form is written so that its matmuls are exactly the ones the analytic model counts
(hhbench.analytic.flops): per chunk of C tokens, five C x C products and three products with the state. The
triangular solve is a forward substitution of elementwise operations, as in fla's naive reference, so that
FlopCounterMode sees only the counted products, forward and backward.
"""

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the reference computes in: fp32, or wider if `t` is (fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).to(compute_dtype(t))


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I - a)^-1 for strictly lower-triangular a [..., C, C], by forward substitution:
    row i of the inverse is e_i + sum_{j<i} a[i, j] * row j."""
    C = a.shape[-1]
    eye = torch.eye(C, dtype=a.dtype, device=a.device)
    rows = [eye[0].expand(a.shape[:-1])]
    for i in range(1, C):
        previous = torch.stack(rows, dim=-2)
        rows.append(eye[i] + (a[..., i, :i, None] * previous).sum(-2))
    return torch.stack(rows, dim=-2)


def gdn_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise Gated DeltaNet (fla's layout, module docstring): q, k [B, T, H, K], v [B, T, H, V], g and beta
    [B, T, H], chunks of `chunk_size` tokens (T padded up to whole chunks), `scale` default K^-0.5. Returns (o
    [B, T, H, V] in v's dtype, final state [B, H, K, V] in the compute dtype, or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = map(_heads_first, (q, k, v, g, beta))
    pad = (-T) % C
    if pad:  # zero keys, values, beta and log decay: padded steps leave the state as it is
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    g, beta = (t.reshape(B, H, N, C) for t in (g, beta))

    q = q * scale
    g = g.cumsum(-1)  # log decay from the chunk start, inclusive
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strictly_lower = lower.tril(-1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # exp(g_i - g_j), i >= j
    k_beta = k * beta[..., None]

    # WY form of the chunk: with T_c = (I + strict_lower(K_beta K^T * decay))^-1,
    # u = T_c V_beta (values net of the chunk's own deltas) and w = T_c K_beta_decay (what the state contributes).
    t_c = _unit_lower_inverse(-(k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strictly_lower, 0))
    u = t_c @ (v * beta[..., None])
    w = t_c @ (k_beta * g.exp()[..., None])

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for n in range(N):
        scores = (q[:, :, n] @ k[:, :, n].transpose(-1, -2)) * decay[:, :, n]
        v_new = u[:, :, n] - w[:, :, n] @ state
        outputs.append((q[:, :, n] * g[:, :, n, :, None].exp()) @ state + scores @ v_new)
        g_last = g[:, :, n, -1]
        k_to_end = k[:, :, n] * (g_last[..., None] - g[:, :, n]).exp()[..., None]
        state = state * g_last.exp()[..., None, None] + k_to_end.transpose(-1, -2) @ v_new

    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def gdn_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log decay g = -exp(A_log) * softplus(a + dt_bias) of the gate input a [..., H] with A_log, dt_bias [H], in
    fp32 at least (Gated DeltaNet, Mamba2; fla's fused_gdn_gate and its recurrent kernel's in-kernel gate)."""
    dtype = compute_dtype(a)
    return -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))


def gdn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k [B, H, K], v [B, H, V], g and beta [B, H], state [B, H, K, V] (fp32).
    Three products with the state (read with k, rank-1 update, read with q): 6*K*V FLOPs per head."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(v)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    state = state.to(dtype) * g.exp()[..., None, None]
    predicted = (k.unsqueeze(-2) @ state).squeeze(-2)
    delta = beta[..., None] * (v - predicted)
    state = state + k.unsqueeze(-1) @ delta.unsqueeze(-2)
    o = ((q * scale).unsqueeze(-2) @ state).squeeze(-2)
    return o, state


def gdn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token by token, [B, T, H, *] in and out: the oracle the chunked forms are checked against."""
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=compute_dtype(v)) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        o, state = gdn_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outputs.append(o)
    o = torch.stack(outputs, dim=1).to(v.dtype)
    return o, (state if output_final_state else None)
