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
on the transformers Cache object it is handed, keyed by layer, and starts a fresh one when that cache holds no
token for the layer yet (a new prompt). It also writes a one-float-per-token marker into the transformers cache
so that the cache's length, which the model uses for positions and masks, stays right.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hhbench.errors import UserError
from hhbench.layers.hydrahead import HydraAttention, LayerCache
from hhbench.spec.layout import LayerPlan
from hhbench.spec.shapes import shape_from_config_dict

STATES = "_hhbench_states"  # attribute of a transformers Cache holding the adapters' LayerCaches


@dataclass(frozen=True)
class GDNInit:
    """How the new GDN parameters of a converted head start: close to causal linear attention over the head's
    original (un-rotated) q, k and v.

    - conv: identity taps (the current token's weight, others 0). q and k then go through SiLU and L2 norm; with
      a tap of `qk_conv` the feature map is silu(c q)/|silu(c q)|. v goes through SiLU too: a small tap
      (`v_conv`) keeps silu(c v) ~ c v / 2 nearly linear in v, and the per-head RMSNorm after the recurrence
      removes the factor c/2 (the recurrence is linear in v).
    - beta = sigmoid(b_proj x + bias) with zero weight: a constant `beta`. Small beta makes the delta rule's
      correction term (beta^2) negligible, so S_t ~ sum_s beta k_s v_s^T: plain linear attention.
    - decay exp(g) with g = -exp(A_log) softplus(a_proj x + dt_bias), zero weight and A_log = 0: a constant
      g = -1/tau per head, tau log-spaced over [tau_min, tau_max] tokens: long memories close to no decay.
    - output gate silu(g_proj x + bias) with zero weight and bias `gate` = 1.2785: silu = 1.0, a constant that
      keeps the head alive (a zero bias would give silu(0) = 0 and silence it) and trains from a non-flat spot.
    - per-head RMSNorm weight 1 and gamma = the teacher head's RMS output on calibration tokens (divided by the
      gate's value for GDN heads), so that every head of a converted layer, FA heads included (HydraHead
      normalizes those too), starts with the scale the teacher's head had on average ("gamma fusion").
    The defaults are the best of a small grid by cosine similarity between the GDN head's output and the
    teacher head's on SmolLM2-135M (README, `hhbench eval` section).
    """

    qk_conv: float = 3.0
    v_conv: float = 0.1
    beta: float = 0.05
    tau_min: float = 32.0
    tau_max: float = 8192.0
    gate: float = 1.2785


def decoder_layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers (not a Llama-family LM)")
    return layers


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
    try:
        model(input_ids.to(model.device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return rms


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
        cache = cache if cache is not None else past_key_values
        if cache is None:
            return self.attn(hidden_states, position_embeddings), None
        B, T = hidden_states.shape[:2]
        states = cache.__dict__.setdefault(STATES, {})
        state: LayerCache | None = states.get(self.layer_idx)
        if cache.get_seq_length(self.layer_idx) == 0 or state is None:  # a new prompt
            state = self.attn.new_cache(B, T + 256, hidden_states.device, hidden_states.dtype)
            states[self.layer_idx] = state
            out = self.attn(hidden_states, position_embeddings, cache=state)
        else:  # continuation: token by token through the decode path
            cos, sin = position_embeddings
            outs = []
            for t in range(T):
                state.ensure_capacity(state.length + 1)
                step = (cos[..., t : t + 1, :], sin[..., t : t + 1, :])
                outs.append(self.attn(hidden_states[:, t : t + 1], step, cache=state))
            out = torch.cat(outs, dim=1)
        marker = hidden_states.new_zeros(B, 1, T, 1)
        cache.update(marker, marker, self.layer_idx)
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
    attn_module, config, fa_heads, init: GDNInit, fa_backend: str, gdn_backend: str, head_rms=None
) -> HydraAttention:
    """A HydraAttention holding the teacher attention's weights, with new GDN parameters as `init` says and
    gammas from head_rms [heads] (the teacher heads' RMS outputs)."""
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
        init_gdn(hydra, init, head_rms)
    return hydra


@torch.no_grad()
def init_gdn(hydra: HydraAttention, init: GDNInit, head_rms: torch.Tensor | None = None) -> None:
    """Set a HydraAttention's new parameters as GDNInit says; head_rms [heads] sets gamma (else 1)."""
    gdn = hydra.gdn
    n = gdn.n_heads
    gdn.a_proj.weight.zero_()
    gdn.A_log.zero_()
    if n == 1:
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
):
    """Convert `model` in place to `plan`; head_rms [layers, heads] from `teacher_head_rms` sets gamma."""
    layers = decoder_layers(model)
    config = model.config
    if plan.shape.n_layers != len(layers) or plan.shape.n_heads != config.num_attention_heads:
        raise ValueError(f"plan for {plan.shape.name} does not fit {type(model).__name__}")
    if len(plan.layers) != len(layers):
        raise ValueError("a conversion needs one plan entry per layer")
    check_convertible(model, plan)
    for i, (layer, assignment) in enumerate(zip(layers, plan.layers, strict=True)):
        if assignment.n_la == 0:
            continue  # no GDN head: the teacher's module, untouched
        rms = head_rms[i] if head_rms is not None else None
        hydra = build_hydra(layer.self_attn, config, assignment.fa_heads, init, fa_backend, gdn_backend, rms)
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
