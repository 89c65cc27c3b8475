"""Conversion of a Hugging Face Llama-family causal LM (Llama, Qwen2, Qwen3, SmolLM2) into a head-level
HydraHead or a layer-wise hybrid, in place.

Every layer whose plan has a GDN head gets its `self_attn` replaced by a `HydraAdapter` around the one
HydraHead module (`hhbench.layers.hydrahead.HydraAttention`); a layer with no GDN head keeps the teacher's
attention module object untouched, so ratio 0:1 is the teacher exactly and the FA layers of a layer-wise
hybrid are bit-identical to the teacher's.

Reused from the teacher: the q/k/v projections (fused into one Linear, original head order: each GDN head reads
its own query rows and its KV group's key/value rows, as the FA head it replaces did), o_proj, Qwen3's q/k norms,
and everything outside attention. New, per GDN head: the decay gate (a_proj, A_log, dt_bias), beta (b_proj), the
short causal convs on q/k/v, the output gate (g_proj); per head of a converted layer: the RMSNorm weight and
gamma. `GDNInit` says how the new parameters start (see its docstring for the rationale).

Generation with a cache: the adapter keeps its own LayerCache (FA K/V of its FA groups, GDN state, conv states)
on the transformers cache's layer object for its layer (`HydraCacheLayer`), and starts a fresh one when that cache
holds no token for the layer yet (a new prompt). It also writes a one-float-per-token marker into the transformers
cache so that the cache's length, which the model uses for positions and masks, stays right. The layer object's
edits follow onto the LayerCache: beam search's `reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`
and `reset`; a `crop` that removes tokens (assisted generation, prompt lookup) is refused, as the GDN state cannot
be rolled back.
"""

import functools
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from hhbench.errors import UserError
from hhbench.layers.hydrahead import HydraAttention, LayerCache, apply_rope
from hhbench.spec.layout import LayerPlan
from hhbench.spec.shapes import shape_from_config_dict


@dataclass(frozen=True)
class GDNInit:
    """How the new GDN parameters of a converted head start: close to causal linear attention over the head's
    original (un-rotated) q, k and v, at the output scale that fits the teacher head best.

    - conv: identity taps (the current token's weight, others 0). q and k then go through SiLU and L2 norm; with
      a tap of `qk_conv` the feature map is silu(c q)/|silu(c q)|. v goes through SiLU too: a small tap
      (`v_conv`) keeps silu(c v) ~ c v / 2 nearly linear in v, and the per-head RMSNorm after the recurrence
      removes the factor c/2 (the recurrence is linear in v).
    - beta = sigmoid(b_proj x + bias) with zero weight: a constant `beta`. Small beta makes the delta rule's
      correction term (beta^2) negligible, so S_t ~ sum_s beta k_s v_s^T: plain linear attention.
    - decay exp(g) with g = -exp(A_log) softplus(a_proj x + dt_bias), zero weight and A_log = 0: a constant
      g = -1/tau per head. `decay` says where tau comes from: "distance-nosink" (default) gives each GDN head
      the tau whose exponential weights have the teacher head's mean attention distance on the calibration
      tokens (`teacher_head_tau`), key 0 left out (attention a head parks on the first token, the sink, would
      otherwise count as long-range), clamped to [tau_min, tau_max]: local heads get short memories, broad
      heads long ones. "distance" keeps key 0; "spread" log-spaces tau over [tau_min, tau_max] in head order,
      ignoring the teacher (the fallback where `convert` gets no head_tau).
    - output gate silu(g_proj x + bias) with zero weight and bias `gate` = 1.2785: silu = 1.0, a constant that
      keeps the head alive (a zero bias would give silu(0) = 0 and silence it) and trains from a non-flat spot.
    - per-head RMSNorm weight 1 and a scale gamma per head of a converted layer (FA heads too: HydraHead
      normalizes them). `gamma` = "least-squares" (default, where `convert` gets calibration tokens): the
      scale that minimizes the squared error between the head's output (after norm and gate) and the teacher
      head's, each layer fed the teacher's inputs: sum <o_teacher, o> / sum |o|^2 with o at gamma 1. A head
      whose output only partly follows the teacher's gets less than the teacher's RMS (its correlation times
      it), so each head's error is at most a silent head's. "rms": the teacher head's RMS output over
      the gate's value (`head_rms`), which does not make a GDN head put out the teacher's RMS: its raw output
      (beta times v's small tap times d^-1/2) has a mean square near the norm's eps (1e-5 in SmolLM2), which
      damps it to about a quarter of gamma there (measured: 0.22-0.24), while heads that follow the teacher
      poorly keep their full scale.
    Measured on SmolLM2-135M (docs/results.md, "Initialization of converted heads", results/init-smollm2-135m and
    -1k): perplexity on held-out text (8 x 1024 tokens) of the converted, untrained head:7:1 / head:3:1 /
    layer:3:1 models went from 6690 / 3972 / 8284 (spread decays, RMS gammas) to 495 / 395 / 301 (the teacher:
    12.8). The least-squares gammas give most of it (518 / 516 / 356 with spread decays), the teacher's
    distances the rest; with key 0 kept they score 495 / 413 / 311 (at 4 x 512 tokens the two are within 5%,
    in the other order). The conv taps and beta are the best of a grid by cosine similarity with the teacher
    head's output; beta 0.3 and v tap 1 measured worse (4 x 512 tokens: 1320 / 686 / 884 and 2409 / 1255 /
    867, against 405 / 349 / 279 at beta 0.05 and tap 0.1).
    """

    qk_conv: float = 3.0
    v_conv: float = 0.1
    beta: float = 0.05
    tau_min: float = 32.0
    tau_max: float = 8192.0
    gate: float = 1.2785
    decay: str = "distance-nosink"
    gamma: str = "least-squares"

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"GDNInit.decay {self.decay!r} is not one of {', '.join(DECAYS)}")
        if self.gamma not in GAMMAS:
            raise ValueError(f"GDNInit.gamma {self.gamma!r} is not one of {', '.join(GAMMAS)}")


DECAYS = ("spread", "distance", "distance-nosink")
GAMMAS = ("rms", "least-squares")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a transformers Llama-family LM (model.model.layers). Raises ValueError for a model
    without them."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers (not a Llama-family LM)")
    return layers


def _forward_with_hooks(model, input_ids: torch.Tensor, hooks: list) -> None:
    """One forward pass over input_ids [B, T] with the hook handles attached, which are removed after it."""
    try:
        model(input_ids.to(model.device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()


@torch.no_grad()
def teacher_head_rms(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[layers, heads]: the RMS of every attention head's output (the input of o_proj) over `input_ids`."""
    layers = decoder_layers(model)
    config = model.config
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    rms = torch.zeros(len(layers), heads)
    hooks = []
    for i, layer in enumerate(layers):

        def hook(module, args, i=i):
            o = args[0].float().reshape(*args[0].shape[:-1], heads, head_dim)
            rms[i] = o.pow(2).mean(dim=(0, 1, 3)).sqrt().cpu()

        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    _forward_with_hooks(model, input_ids, hooks)
    return rms


@torch.no_grad()
def teacher_attention_distance(model, input_ids: torch.Tensor, skip_sink: bool = False) -> torch.Tensor:
    """[layers, heads]: every attention head's mean attention distance over `input_ids` [B, T], in tokens: the
    softmax-weighted lag sum_s a_ts (t - s) of each query t, averaged over queries and batch (the statistic
    of Vig & Belinkov 2019 and of the ViT papers). The weights are recomputed from the q/k projections the
    layer is called with (RoPE, Qwen3's q/k norms, GQA), so any attention implementation works. `skip_sink`
    leaves out key 0 (the attention sink most heads park mass on) and renormalizes over the rest."""
    layers = decoder_layers(model)
    config = model.config
    heads, kv, head_dim = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    distance = torch.zeros(len(layers), heads)
    hooks = []
    for i, layer in enumerate(layers):

        def hook(module, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            B, T, _ = x.shape
            q = module.q_proj(x).view(B, T, heads, head_dim)
            k = module.k_proj(x).view(B, T, kv, head_dim)
            if getattr(module, "q_norm", None) is not None:
                q, k = module.q_norm(q), module.k_norm(k)
            cos, sin = kwargs["position_embeddings"]
            q, k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
            k = k.repeat_interleave(heads // kv, dim=2)
            scale = getattr(module, "scaling", head_dim**-0.5)
            scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
            lag = torch.arange(T, device=x.device)
            lag = (lag[:, None] - lag[None, :]).float()
            masked = lag < 0
            if skip_sink:
                masked = masked | (torch.arange(T, device=x.device) == 0)[None, :]
            probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
            per_query = (probs * lag.clamp(min=0)).sum(-1)  # [B, heads, T]
            per_query = per_query[..., 1:] if skip_sink else per_query  # query 0 sees only the sink
            distance[i] = per_query.mean(dim=(0, 2)).cpu()

        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    _forward_with_hooks(model, input_ids, hooks)
    return distance


def decay_mean_distance(tau: torch.Tensor, length: int) -> torch.Tensor:
    """The mean attention distance of causal weights exp(-lag/tau) over a sequence of `length` tokens (each
    query t weighs lags 0..t; the mean over queries), for every tau [n] in tokens: what an exponentially decaying
    linear-attention head with equal key similarities would measure. Increasing in tau, from 0 to (length-1)/4."""
    r = torch.exp(-1.0 / tau.double())[:, None]  # [n, 1]
    n = torch.arange(1, length + 1, dtype=torch.float64)[None, :]  # lags 0..t: n = t + 1 of them
    # mean of a geometric distribution truncated to 0..n-1: r/(1-r) - n r^n / (1-r^n)
    mean = r / (1 - r) - n * r**n / (1 - r**n)
    return mean.mean(dim=1).to(tau.dtype)


def tau_for_distance(distance: torch.Tensor, length: int, tau_min: float, tau_max: float) -> torch.Tensor:
    """The decay time constant tau (tokens) whose exponential weights have the mean attention distance
    `distance` [...] over `length` tokens (the inverse of `decay_mean_distance`, by bisection on log tau),
    clamped to [tau_min, tau_max]. A head as broad as uniform attention gets tau_max."""
    flat = distance.reshape(-1).double()
    lo = torch.full_like(flat, math.log(tau_min))
    hi = torch.full_like(flat, math.log(tau_max))
    for _ in range(50):
        mid = (lo + hi) / 2
        below = decay_mean_distance(mid.exp(), length) < flat
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).exp().to(distance.dtype).reshape(distance.shape)


@torch.no_grad()
def teacher_attention_io(model, input_ids: torch.Tensor) -> list[tuple]:
    """Per layer: (its attention's input hidden states [B, T, hidden], (cos, sin), its heads' outputs
    [B, T, heads, head_dim], the input of o_proj) over `input_ids`: what a layer-local fit matches."""
    layers = decoder_layers(model)
    config = model.config
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    io: list[list] = [[None, None, None] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):

        def inputs(module, args, kwargs, i=i):
            io[i][0] = kwargs.get("hidden_states", args[0] if args else None)
            io[i][1] = kwargs["position_embeddings"]

        def outputs(module, args, i=i):
            io[i][2] = args[0].reshape(*args[0].shape[:-1], heads, head_dim)

        hooks.append(layer.self_attn.register_forward_pre_hook(inputs, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(outputs))
    _forward_with_hooks(model, input_ids, hooks)
    return [tuple(entry) for entry in io]


@torch.no_grad()
def head_outputs(hydra: HydraAttention, x: torch.Tensor, position_embeddings) -> torch.Tensor:
    """[B, T, heads, head_dim]: a HydraAttention's head outputs (after norm, gamma and gate: the input of
    o_proj) for the layer input x [B, T, hidden]."""
    captured = []
    handle = hydra.o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    glue, hydra.glue = hydra.glue, "reference"  # the fused glue applies o_proj's weight itself: no hook fires
    try:
        hydra(x, position_embeddings)
    finally:
        handle.remove()
        hydra.glue = glue
    return captured[0].reshape(*x.shape[:2], hydra.n_heads, hydra.head_dim)


@torch.no_grad()
def fit_head_gamma(hydra: HydraAttention, x: torch.Tensor, position_embeddings, target: torch.Tensor) -> None:
    """Set every head's gamma to the least-squares scale of its output (after norm and gate, at gamma 1) onto
    `target` [B, T, heads, head_dim], the teacher heads' outputs for the layer input x [B, T, hidden]."""
    hydra.head_gamma.fill_(1.0)
    o, target = head_outputs(hydra, x, position_embeddings).float(), target.float()
    gamma = (o * target).sum(dim=(0, 1, 3)) / o.pow(2).sum(dim=(0, 1, 3)).clamp_min(1e-30)
    hydra.head_gamma.copy_(gamma)


def teacher_head_tau(model, input_ids: torch.Tensor, init: GDNInit) -> torch.Tensor | None:
    """[layers, heads]: decay time constants (tokens) whose exponential weights have each teacher head's mean
    attention distance over `input_ids` [B, T], as init.decay says; None for "spread" (no teacher statistic)."""
    if init.decay == "spread":
        return None
    skip_sink = init.decay == "distance-nosink"
    distance = teacher_attention_distance(model, input_ids, skip_sink=skip_sink)
    length = input_ids.shape[-1] - int(skip_sink)
    return tau_for_distance(distance, length, init.tau_min, init.tau_max)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class HydraCacheLayer:
    """Mixin over a transformers cache layer class (DynamicLayer, StaticLayer, ...; `with_hydra_state` makes the
    subclass) that carries one converted layer's decoding state `hydra` (a LayerCache: FA K/V [B, S_max, G, d], GDN
    state [B, n_la, dk, dv], conv state [B, 3 n_la d, K], `length`) next to the marker keys transformers counts, so
    that the edits transformers makes to the layer apply to our state too (each calls the base class's first):
    - reorder_cache(beam_idx [B']) (beam search, after every step), batch_select_indices(indices [B']),
      batch_repeat_interleave(repeats): the same index on the batch dim of every LayerCache tensor;
    - reset(): drops the state (the next forward prefills afresh);
    - crop(n): raises ValueError where it would remove tokens, and `is_croppable` is False while a state is held
      (transformers 5.24's assisted decoding then refuses before its first crop; 5.17's crops): the GDN state after an earlier
      token is gone, and recomputing it would mean a new prefill. crop(0), which only trims what a layer recorded
      for a rollback, passes."""

    hydra: LayerCache | None = None

    @property
    def is_croppable(self) -> bool:
        """False while a state is held: its GDN state cannot be cropped (transformers then refuses assisted
        decoding)."""
        return self.hydra is None and super().is_croppable

    def crop(self, tokens_to_remove: int) -> None:
        """The base class's crop; raises ValueError first where it would remove tokens of a held state."""
        # A negative count removes that many tokens; before transformers 5.18 a positive one was the length to keep.
        if self.hydra is not None and (tokens_to_remove < 0 or 0 < tokens_to_remove < self.hydra.length):
            raise ValueError(
                "a converted model's GDN heads cannot roll back their state (the cache was asked to drop tokens): "
                "assisted generation / prompt lookup are not supported"
            )
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """The base class's reorder, and the same batch index beam_idx [B'] on the state's tensors."""
        super().reorder_cache(beam_idx)
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """The base class's select, and the same batch rows `indices` [B'] of the state's tensors."""
        super().batch_select_indices(indices)
        self._index_batch(lambda t: t[torch.as_tensor(indices, device=t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """The base class's repeat, and each batch row of the state's tensors `repeats` times in a row."""
        super().batch_repeat_interleave(repeats)
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """The base class's reset, and the state dropped (the next forward prefills afresh)."""
        super().reset()
        self.hydra = None

    def _index_batch(self, index) -> None:
        """Replace every tensor of the LayerCache by index(tensor): all of them lead with the batch dim."""
        if self.hydra is not None:
            for field in fields(self.hydra):
                value = getattr(self.hydra, field.name)
                if isinstance(value, torch.Tensor):
                    setattr(self.hydra, field.name, index(value))


@functools.cache
def with_hydra_state(base: type) -> type:
    """The subclass of a transformers cache layer class `base` that carries a LayerCache (HydraCacheLayer); one per
    base class."""
    return type(base)(f"Hydra{base.__name__}", (HydraCacheLayer, base), {})


class HydraAdapter(nn.Module):
    """A HydraAttention in the place of a transformers attention module: same call, same (output, weights)."""

    def __init__(self, attn: HydraAttention, layer_idx: int):
        super().__init__()
        self.attn = attn
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        """hidden_states [B, T, hidden] -> (output [B, T, hidden], None), as transformers calls an attention module;
        with a cache, a new prompt is prefilled and a continuation decoded token by token (module docstring).
        Raises ValueError for a cache without per-layer objects (`cache.layers`, transformers 5), and where the
        cache holds another number of tokens than our state (it was edited in a way HydraCacheLayer does not follow)."""
        cache = cache if cache is not None else past_key_values
        if cache is None:
            return self.attn(hidden_states, position_embeddings), None
        if not hasattr(cache, "layers"):
            raise ValueError(
                f"a converted model needs a transformers cache with per-layer objects (cache.layers, as transformers "
                f"5 has them) to keep its state on, not a {type(cache).__name__} without"
            )
        B, T = hidden_states.shape[:2]
        held = cache.get_seq_length(self.layer_idx)
        layers = cache.layers  # a lazily filled cache has no object yet for a layer it has not seen
        state = getattr(layers[self.layer_idx], "hydra", None) if self.layer_idx < len(layers) else None
        if held == 0 or state is None:  # a new prompt
            state = self.attn.new_cache(B, T + 256, hidden_states.device, hidden_states.dtype)
            out = self.attn(hidden_states, position_embeddings, cache=state)
        elif state.length != held:
            raise ValueError(
                f"layer {self.layer_idx}: the transformers cache holds {held} tokens and the converted layer's state "
                f"{state.length}: the cache was edited in a way a converted model cannot follow"
            )
        else:  # continuation: token by token through the decode path
            cos, sin = position_embeddings
            outs = []
            for t in range(T):
                state.ensure_capacity(state.length + 1)
                step = (cos[..., t : t + 1, :], sin[..., t : t + 1, :])
                outs.append(self.attn(hidden_states[:, t : t + 1], step, cache=state))
            out = torch.cat(outs, dim=1)
        marker = hidden_states.new_zeros(B, 1, T, 1)
        cache.update(marker, marker, self.layer_idx)  # creates the layer object of a lazily filled cache
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, HydraCacheLayer):
            # In its place, an object of the subclass with the same data (Python refuses to assign __class__ here:
            # the mixin as first base changes the object layout it checks).
            hydra_layer = object.__new__(with_hydra_state(type(layer)))
            hydra_layer.__dict__.update(vars(layer))
            cache.layers[self.layer_idx] = layer = hydra_layer
        layer.hydra = state
        return out, None


def cache_kwarg(model) -> str:
    """The keyword a transformers model takes its cache by: `cache` from transformers 5.2x, `past_key_values`
    before (the lent GPU machines have 5.17). Passed under the other name, the cache would be ignored."""
    params = inspect.signature(getattr(model, "model", model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _reject_padding(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "a converted model takes no padded batches (its GDN heads cannot skip padding): use batch size 1"
        )


def build_hydra(
    attn_module, config, fa_heads, init: GDNInit, fa_backend: str, gdn_backend: str, head_rms=None, head_tau=None
) -> HydraAttention:
    """A HydraAttention holding the teacher attention's weights, with new GDN parameters as `init` says,
    gammas from head_rms [heads] (the teacher heads' RMS outputs) and decays from head_tau [heads] (tokens)."""
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    from hhbench.models.loader import rope_theta_of

    q, k, v, o = attn_module.q_proj, attn_module.k_proj, attn_module.v_proj, attn_module.o_proj
    q_norm = getattr(attn_module, "q_norm", None)
    hydra = HydraAttention(
        config.hidden_size,
        heads,
        kv,
        d,
        fa_heads,
        fa_backend=fa_backend,
        gdn_backend=gdn_backend,
        rope_theta=rope_theta_of(config),
        qk_norm=q_norm is not None,
        norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        qkv_bias=q.bias is not None,
        o_bias=o.bias is not None,
        gdn_gate_bias=True,
    ).to(device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        hydra.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            hydra.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        hydra.o_proj.weight.copy_(o.weight)
        if o.bias is not None:
            hydra.o_proj.bias.copy_(o.bias)
        if q_norm is not None:
            hydra.q_norm.weight.copy_(q_norm.weight)
            hydra.k_norm.weight.copy_(attn_module.k_norm.weight)
    if hydra.gdn is not None:
        init_gdn(hydra, init, head_rms, head_tau)
    return hydra


@torch.no_grad()
def init_gdn(
    hydra: HydraAttention, init: GDNInit, head_rms: torch.Tensor | None = None, head_tau: torch.Tensor | None = None
) -> None:
    """Set a HydraAttention's new parameters as GDNInit says; head_rms [heads] sets gamma (else 1), head_tau
    [heads] the GDN heads' decay time constants in tokens (clamped to [tau_min, tau_max]; else log-spaced)."""
    gdn = hydra.gdn
    n = gdn.n_heads
    gdn.a_proj.weight.zero_()
    gdn.A_log.zero_()
    if head_tau is not None:
        tau = head_tau.float()[list(hydra.split.la_heads)].clamp(init.tau_min, init.tau_max)
    elif n == 1:
        tau = torch.tensor([math.sqrt(init.tau_min * init.tau_max)])
    else:
        tau = torch.logspace(math.log10(init.tau_min), math.log10(init.tau_max), n)
    dt = 1.0 / tau
    gdn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(1/tau)
    gdn.b_proj.weight.zero_()
    gdn.b_proj.bias.fill_(math.log(init.beta / (1 - init.beta)))
    if gdn.g_proj is not None:
        gdn.g_proj.weight.zero_()
        gdn.g_proj.bias.fill_(init.gate)
    if gdn.conv_size:
        for weight, tap in ((gdn.conv_q, init.qk_conv), (gdn.conv_k, init.qk_conv), (gdn.conv_v, init.v_conv)):
            weight.zero_()
            weight[:, -1] = tap
    hydra.head_norm_weight.fill_(1.0)
    gamma = torch.ones(hydra.n_heads) if head_rms is None else head_rms.float().clone()
    if gdn.g_proj is not None:
        gate = F.silu(torch.tensor(init.gate)).item()
        la = torch.tensor(hydra.split.la_heads)
        gamma[la] = gamma[la] / gate
    hydra.head_gamma.copy_(gamma)


def check_convertible(model, plan: LayerPlan) -> None:
    """Refuse, in one line, a conversion whose HydraHead layers would compute what the teacher's do not. The
    config is read as `shape_from_config_dict` reads it (unknown architectures and partial RoPE are refused
    there); attention dropout is refused (HydraHead applies none); a layer with a sliding window may keep it only
    where it stays the teacher's module (no GDN head) or loses attention (no FA head): HydraHead's FA backends
    attend to every earlier key."""
    config = model.config.to_dict()
    shape = shape_from_config_dict(config, plan.shape.name, f"{type(model).__name__} config")
    if any(layer.n_la for layer in plan.layers) and config.get("attention_dropout"):
        raise UserError(
            f"{shape.name} has attention_dropout={config['attention_dropout']}: HydraHead layers apply none; "
            "set it to 0 in the config"
        )
    mixed = [i for i, layer in enumerate(plan.layers) if layer.n_fa and layer.n_la and shape.window(i)]
    if mixed:
        raise UserError(
            f"{shape.name} has sliding-window attention ({shape.windowed}), and HydraHead's FA heads attend to every "
            f"earlier key: converting layers {mixed[:4]}{'...' if len(mixed) > 4 else ''} with both kinds of heads "
            "would change what they compute; use a layer-wise variant or a model without sliding windows"
        )


def convert(
    model,
    plan: LayerPlan,
    head_rms: torch.Tensor | None = None,
    init: GDNInit = GDNInit(),  # noqa: B008  (frozen)
    fa_backend: str = "auto",
    gdn_backend: str = "auto",
    head_tau: torch.Tensor | None = None,
    calibration_ids: torch.Tensor | None = None,
):
    """Convert `model` in place to `plan`; head_rms [layers, heads] from `teacher_head_rms` sets gamma, head_tau
    [layers, heads] from `teacher_head_tau` the GDN heads' decays (else GDNInit's log-spaced ones). With
    calibration_ids [B, T] and init.gamma "least-squares", gammas are fitted to the teacher's head outputs on them
    instead (one teacher forward before conversion)."""
    layers = decoder_layers(model)
    config = model.config
    if plan.shape.n_layers != len(layers) or plan.shape.n_heads != config.num_attention_heads:
        raise ValueError(f"plan for {plan.shape.name} does not fit {type(model).__name__}")
    if len(plan.layers) != len(layers):
        raise ValueError("a conversion needs one plan entry per layer")
    check_convertible(model, plan)
    fit = calibration_ids is not None and init.gamma == "least-squares" and any(a.n_la for a in plan.layers)
    io = teacher_attention_io(model, calibration_ids) if fit else None
    for i, (layer, assignment) in enumerate(zip(layers, plan.layers, strict=True)):
        if assignment.n_la == 0:
            continue  # no GDN head: the teacher's module, untouched
        rms = head_rms[i] if head_rms is not None else None
        tau = head_tau[i] if head_tau is not None else None
        hydra = build_hydra(layer.self_attn, config, assignment.fa_heads, init, fa_backend, gdn_backend, rms, tau)
        if io is not None:
            fit_head_gamma(hydra, *io[i])
        layer.self_attn = HydraAdapter(hydra, i)
    if any(a.n_la for a in plan.layers) and not getattr(model, "_hhbench_guard", False):
        getattr(model, "model", model).register_forward_pre_hook(_reject_padding, with_kwargs=True)
        model._hhbench_guard = True
    model.hhbench_plan = plan
    return model


def parameter_groups(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The converted model's parameters as `reused` (the teacher's, copied or untouched) and `new` (GDN gates,
    convs, output gate, per-head norms and gammas): distillation trains `new` first."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"reused": [], "new": []}
    for name, param in model.named_parameters():
        new = ".attn.gdn." in name or name.endswith(("head_norm_weight", "head_gamma"))
        groups["new" if new else "reused"].append((name, param))
    return groups


def layer_outputs(model, input_ids: torch.Tensor, **kwargs):
    """(logits, hidden states after the embedding and after every layer): what layer-wise distillation matches."""
    out = model(input_ids, output_hidden_states=True, use_cache=False, **kwargs)
    return out.logits, out.hidden_states
