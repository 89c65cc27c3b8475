"""Conversion of a Hugging Face Llama into HydraHead and layer-wise hybrids (a tiny random Llama, CPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hhbench.layers.hydrahead import HydraAttention, rope_cos_sin
from hhbench.models import loader
from hhbench.models.convert import (
    GDNInit,
    HydraAdapter,
    cache_kwarg,
    convert,
    decay_mean_distance,
    decoder_layers,
    head_outputs,
    layer_outputs,
    parameter_groups,
    tau_for_distance,
    teacher_attention_distance,
    teacher_attention_io,
    teacher_head_rms,
    teacher_head_tau,
)
from hhbench.models.variants import parse_variant

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny():
    loader.offline()
    from transformers import LlamaConfig

    model = loader.tiny_llama(vocab=100, seed=0).eval()
    shape = loader.shape_from_config_dict(model.config.to_dict(), "tiny")
    assert isinstance(model.config, LlamaConfig)
    return model, shape


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 100, (1, 48), generator=torch.Generator().manual_seed(1))


def converted(tiny, variant: str, ids=None):
    model, shape = tiny
    rms = teacher_head_rms(model, ids) if ids is not None else None
    return convert(copy.deepcopy(model), parse_variant(variant).plan(shape), rms)


@torch.no_grad()
def test_ratio_0_1_is_the_teacher_exactly(tiny, ids):
    model, _ = tiny
    out = converted(tiny, "head:0:1")
    assert not any(isinstance(layer.self_attn, HydraAdapter) for layer in decoder_layers(out))
    assert torch.equal(out(ids).logits, model(ids).logits)


@torch.no_grad()
def test_layerwise_fa_layers_are_untouched_and_bit_identical(tiny, ids):
    model, _ = tiny
    out = converted(tiny, "layer:3:1", ids)
    kinds = [type(layer.self_attn) for layer in decoder_layers(out)]
    assert kinds[3] is type(decoder_layers(model)[3].self_attn)  # every 4th layer keeps full attention
    assert all(kind is HydraAdapter for kind in kinds[:3])
    captured = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            captured[name] = (kwargs["hidden_states"].clone(), output[0].clone())

        return hook

    layer = decoder_layers(model)[3].self_attn
    handle = layer.register_forward_hook(grab("teacher"), with_kwargs=True)
    model(ids)
    handle.remove()
    handle = decoder_layers(out)[3].self_attn.register_forward_hook(grab("student"), with_kwargs=True)
    out(ids)
    handle.remove()
    for name, param in layer.named_parameters():
        assert torch.equal(param, dict(decoder_layers(out)[3].self_attn.named_parameters())[name])
    # same input -> bit-identical output of the FA layer
    x = captured["teacher"][0]
    cos_sin = model.model.rotary_emb(x, torch.arange(x.shape[1])[None])
    a = layer(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
    b = decoder_layers(out)[3].self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
    assert torch.equal(a, b)


def test_gdn_heads_parameters_shapes_and_init(tiny, ids):
    model, shape = tiny
    out = converted(tiny, "head:3:1", ids)
    plan = out.hhbench_plan
    rms = teacher_head_rms(model, ids)
    init = GDNInit()
    hidden, d = shape.hidden, shape.head_dim
    for i, (layer, teacher_layer) in enumerate(zip(decoder_layers(out), decoder_layers(model), strict=True)):
        attn: HydraAttention = layer.self_attn.attn
        n_la = plan.layers[i].n_la
        assert attn.split.fa_heads == plan.layers[i].fa_heads and n_la == 6  # 8 heads at 3:1: 2 FA, 6 GDN
        gdn = attn.gdn
        assert gdn.a_proj.weight.shape == (n_la, hidden) and gdn.b_proj.weight.shape == (n_la, hidden)
        assert gdn.g_proj.weight.shape == (n_la * d, hidden) and gdn.g_proj.bias.shape == (n_la * d,)
        assert gdn.A_log.shape == (n_la,) and gdn.dt_bias.shape == (n_la,)
        for conv in (gdn.conv_q, gdn.conv_k, gdn.conv_v):
            assert conv.shape == (n_la * d, 4)
            assert torch.count_nonzero(conv[:, :-1]) == 0  # identity taps: only the current token
        assert attn.head_norm_weight.shape == (shape.n_heads, d) and attn.head_gamma.shape == (shape.n_heads,)
        # reused projections, in the original head order
        t = teacher_layer.self_attn
        assert torch.equal(attn.qkv.weight, torch.cat([t.q_proj.weight, t.k_proj.weight, t.v_proj.weight]))
        assert torch.equal(attn.o_proj.weight, t.o_proj.weight)
        # new parameters: constant beta, output gate silu = 1, decays from 1/tau_min to 1/tau_max
        x = torch.randn(2, 5, hidden)
        g, beta = gdn.gates(x)
        assert torch.allclose(beta, torch.full_like(beta, init.beta))
        assert torch.allclose(F.silu(gdn.g_proj(x)), torch.ones(2, 5, n_la * d), atol=1e-4)
        assert torch.allclose(-g[0, 0].min(), torch.tensor(1 / init.tau_min), rtol=1e-3)
        assert torch.allclose(-g[0, 0].max(), torch.tensor(1 / init.tau_max), rtol=1e-3)
        # gamma: the teacher head's RMS output (over the gate's value for GDN heads)
        fa = list(attn.split.fa_heads)
        assert torch.allclose(attn.head_gamma[fa], rms[i, fa])
        la = list(attn.split.la_heads)
        assert torch.allclose(attn.head_gamma[la], rms[i, la] / F.silu(torch.tensor(init.gate)))


def test_parameter_groups(tiny):
    out = converted(tiny, "head:7:1")
    groups = parameter_groups(out)
    new = {name for name, _ in groups["new"]}
    reused = {name for name, _ in groups["reused"]}
    assert new and not new & reused
    assert new | reused == {name for name, _ in out.named_parameters()}
    assert all(".gdn." in n or n.endswith(("head_norm_weight", "head_gamma")) for n in new)
    assert "model.embed_tokens.weight" in reused and "model.layers.0.self_attn.attn.qkv.weight" in reused


@torch.no_grad()
def test_layer_outputs_for_distillation(tiny, ids):
    out = converted(tiny, "head:3:1")
    logits, hidden = layer_outputs(out, ids)
    assert logits.shape == (1, ids.shape[1], 100)
    assert len(hidden) == 4 + 1


@pytest.mark.parametrize("variant", ["head:3:1", "layer:3:1", "head:7:1:random:3"])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_and_greedy_without_cache(tiny, ids, variant):
    out = converted(tiny, variant, ids)
    prompt = ids[:, :24]
    cached = out.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = out.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    from transformers import DynamicCache

    cache = DynamicCache(config=out.config)
    first = out(prompt, **{cache_kwarg(out): cache}, use_cache=True).logits
    steps = [out(ids[:, t : t + 1], **{cache_kwarg(out): cache}, use_cache=True).logits for t in range(24, 32)]
    full = out(ids[:, :32]).logits
    assert torch.allclose(first, full[:, :24], atol=1e-4)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 24:32], atol=1e-4)
    # a new prompt on the same cache object after a reset starts afresh. Before transformers 5.2x reset() only
    # zeroes the layers' keys and keeps their length, so there no model can reuse a reset cache: nothing to check.
    cache.reset()
    if cache.get_seq_length() == 0:
        again = out(prompt, **{cache_kwarg(out): cache}, use_cache=True).logits
        assert torch.allclose(again, first, atol=1e-5)


@pytest.mark.parametrize("variant", ["head:3:1", "layer:3:1"])
@torch.no_grad()
def test_beam_search_and_several_return_sequences_follow_the_cache(tiny, ids, variant):
    """Beam search reorders the cache's batch after every step (Cache.reorder_cache): our LayerCaches must follow,
    or a beam continues from another beam's GDN state. Cached and uncached generation give the same tokens, for beams
    and for several sampled sequences per prompt."""
    out = converted(tiny, variant, ids)
    prompt = ids[:, :12]
    beams = dict(num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=6)
    cached = out.generate(prompt, **beams, use_cache=True)
    assert torch.equal(cached, out.generate(prompt, **beams, use_cache=False))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        sampled.append(
            out.generate(prompt, do_sample=True, num_return_sequences=3, max_new_tokens=6, use_cache=use_cache)
        )
    assert torch.equal(*sampled) and len({tuple(row) for row in sampled[0].tolist()}) > 1


@torch.no_grad()
def test_batch_edits_of_the_cache_index_our_states(tiny, ids):
    """reorder_cache, batch_select_indices and batch_repeat_interleave on a cache the model has prefilled index
    the batch of every LayerCache tensor: the next steps' logits are those of the full forward of the edited batch."""
    from transformers import DynamicCache

    out = converted(tiny, "head:3:1", ids)
    other = torch.randint(4, 100, (1, 48), generator=torch.Generator().manual_seed(3))
    both = torch.cat([ids, other])  # [2, 48]
    cache = DynamicCache(config=out.config)
    by_name = {cache_kwarg(out): cache}
    out(both[:, :20], **by_name, use_cache=True)

    def steps(batch, start, stop):
        return torch.cat([out(batch[:, t : t + 1], **by_name, use_cache=True).logits for t in range(start, stop)], 1)

    cache.reorder_cache(torch.tensor([1, 0]))
    swapped = both.flip(0)
    assert torch.allclose(steps(swapped, 20, 24), out(swapped[:, :24]).logits[:, 20:], atol=1e-4)
    cache.batch_select_indices(torch.tensor([1]))  # `ids`, now second
    cache.batch_repeat_interleave(2)
    pair = ids.expand(2, -1)
    assert torch.allclose(steps(pair, 24, 28), out(pair[:, :28]).logits[:, 24:], atol=1e-4)


@torch.no_grad()
def test_assisted_generation_and_crops_are_refused(tiny, ids):
    """A crop (assisted generation, prompt lookup) would need the GDN state of an earlier token, which is gone: a
    converted model's cache says it is not croppable, so transformers 5.24 refuses assisted decoding after the prefill
    ("...requires a cache that can be cropped..."), and a crop that removes tokens raises (5.17's assisted decoding
    does not ask and crops: there this prompt's first rejected draft raises); crop(0) removes nothing and passes.
    Where the transformers cache is cut behind our back, the next forward raises instead of decoding from a state
    that holds more tokens."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    out = converted(tiny, "head:3:1", ids)
    prompt = torch.cat([ids[:, :12], ids[:, :12]], dim=1)  # repeated n-grams: prompt lookup finds drafts
    with pytest.raises(ValueError, match="can be cropped|GDN heads cannot roll back their state"):
        out.generate(prompt, prompt_lookup_num_tokens=3, do_sample=False, max_new_tokens=6)
    cache = DynamicCache(config=out.config)
    by_name = {cache_kwarg(out): cache}
    out(ids[:, :10], **by_name, use_cache=True)
    assert not cache.is_croppable
    cache.crop(0)
    with pytest.raises(ValueError, match="GDN heads cannot roll back their state"):
        cache.crop(-1)
    assert cache.get_seq_length() == 10
    DynamicLayer.crop(cache.layers[0], -1)  # the base class's crop: ours is bypassed
    with pytest.raises(ValueError, match="holds 9 tokens and the converted layer's state 10"):
        out(ids[:, 9:10], **by_name, use_cache=True)


def test_padded_batches_are_refused(tiny):
    out = converted(tiny, "head:3:1")
    ids = torch.randint(4, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="batch size 1"):
        out(ids, attention_mask=mask)


@torch.no_grad()
def test_gdn_head_starts_close_to_linear_attention():
    """With the default init a GDN head computes nearly causal linear attention over its own q/k/v: features
    normalize(silu(c q)), values ~ v, weights beta * decay: checked against that sum written out."""
    torch.manual_seed(0)
    hidden, d, T = 32, 8, 40
    attn = HydraAttention(hidden, 2, 2, d, fa_heads=(0,), gdn_gate_bias=True)
    from hhbench.models.convert import init_gdn

    init = GDNInit()
    init_gdn(attn, init)
    x = torch.randn(1, T, hidden)
    slots = attn._project(x)
    q, k, v = slots[:, :, :2], slots[:, :, 2:4], slots[:, :, 4:]  # 2 heads, 2 KV heads: one slot each
    _, la = attn._split_inputs(slots, rope_cos_sin(torch.arange(T), d, attn.rope_theta, x.dtype))
    (gq, gk, gv, g, beta), _ = attn.gdn.prepare(la, x)
    o, _ = attn._core("prefill", x.device, x.dtype).prefill_parts(None, (gq, gk, gv, g, beta))[1]
    qf = F.normalize(F.silu(init.qk_conv * q[:, :, 1]), dim=-1)
    kf = F.normalize(F.silu(init.qk_conv * k[:, :, 1]), dim=-1)
    vf = F.silu(init.v_conv * v[:, :, 1])
    decay = g[0, :, 0].cumsum(0)
    weights = (qf[0] @ kf[0].T) * (decay[:, None] - decay[None, :]).exp() * init.beta
    linear = (weights.tril() @ vf[0]) * d**-0.5
    cos = F.cosine_similarity(o[0, :, 0], linear, dim=-1)
    assert cos.mean() > 0.98 and cos.min() > 0.9  # the delta rule's beta^2 correction grows with length


def _windowed(family: str, **window):
    """A tiny random Mistral or Qwen2 (hidden 64, 4 layers, 8 heads of 8, 4 KV heads) with a sliding window."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]  # fmt: skip
    config = config_class(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=8, **window)  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config).eval()
    return model, loader.shape_from_config_dict(config.to_dict(), family)


@torch.no_grad()
def test_the_window_is_read_and_the_teacher_computes_it(ids):
    model, shape = _windowed("mistral", sliding_window=8)
    assert shape.layer_windows == (8, 8, 8, 8)
    full, full_shape = _windowed("mistral", sliding_window=None)
    full.load_state_dict(model.state_dict())
    assert not full_shape.windowed
    assert (model(ids).logits - full(ids).logits).abs().max() > 1e-2  # the window changes what is computed


@pytest.mark.parametrize("variant", ["head:3:1", "head:7:1", "head:1:1"])
def test_head_level_conversion_of_a_windowed_model_is_refused(variant):
    from hhbench.errors import UserError

    model, shape = _windowed("mistral", sliding_window=8)
    with pytest.raises(
        UserError, match=r"sliding-window attention \(window 8 in 4 of 4 layers\).*layers \[0, 1, 2, 3\]"
    ):
        convert(model, parse_variant(variant).plan(shape))


@torch.no_grad()
def test_windows_stay_where_the_teacher_keeps_them(ids):
    """Layer-wise: FA layers stay the teacher's (windowed) modules, GDN layers lose attention altogether; a
    Qwen2 whose window covers only layers 2-3 converts head-level where no converted layer has a window."""
    from hhbench.errors import UserError

    model, shape = _windowed("mistral", sliding_window=8)
    out = convert(copy.deepcopy(model), parse_variant("layer:3:1").plan(shape))
    assert decoder_layers(out)[3].self_attn is not decoder_layers(model)[3].self_attn
    assert type(decoder_layers(out)[3].self_attn) is type(decoder_layers(model)[3].self_attn)
    qwen, qshape = _windowed("qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert qshape.layer_windows == (0, 0, 8, 8)
    with pytest.raises(UserError, match=r"window 8 in 2 of 4 layers.*layers \[2, 3\]"):
        convert(copy.deepcopy(qwen), parse_variant("head:3:1").plan(qshape))
    assert out(ids).logits.isfinite().all()


def test_attention_dropout_is_refused_where_hydrahead_layers_come_in():
    from hhbench.errors import UserError

    model, shape = _windowed("mistral", sliding_window=None, attention_dropout=0.1)
    with pytest.raises(UserError, match=r"attention_dropout=0.1: HydraHead layers apply none"):
        convert(copy.deepcopy(model), parse_variant("layer:3:1").plan(shape))
    assert convert(model, parse_variant("head:0:1").plan(shape)) is model  # no HydraHead layer: nothing changes


def test_tau_for_distance_inverts_the_decay_mean_distance():
    tau = torch.tensor([2.0, 16.0, 100.0, 700.0])
    distance = decay_mean_distance(tau, 512)
    assert torch.allclose(tau_for_distance(distance, 512, 1.0, 1e5), tau, rtol=1e-4)
    # on a long sequence, short decays barely feel its start: the mean lag of exp(-lag/tau) is 1/(e^(1/tau) - 1)
    assert torch.allclose(decay_mean_distance(tau[:2], 8192), 1 / torch.expm1(1 / tau[:2]), rtol=0.01)
    # uniform attention (mean lag t/2, averaged over queries: (T-1)/4) needs an infinite tau: clamped to tau_max
    assert tau_for_distance(torch.tensor([511 / 4]), 512, 1.0, 8192.0).item() == pytest.approx(8192.0)


@torch.no_grad()
def test_teacher_attention_distance_of_known_heads(tiny):
    """A head with zero queries attends uniformly (mean lag (T-1)/4 over queries); one whose query-key score
    is huge on its own token attends to lag 0."""
    model = copy.deepcopy(tiny[0])
    attn = decoder_layers(model)[0].self_attn
    d = 8
    attn.q_proj.weight[:d].zero_()  # head 0: uniform
    T = 33
    ids = torch.randint(4, 100, (1, T), generator=torch.Generator().manual_seed(2))
    distance = teacher_attention_distance(model, ids)
    assert distance.shape == (4, 8)
    assert distance[0, 0].item() == pytest.approx((T - 1) / 4, rel=1e-4)
    assert ((distance >= 0) & (distance <= (T - 1) / 2)).all()
    # key 0 left out: uniform over keys 1..t for queries 1..T-1: mean lag (t-1)/2, averaged: (T-2)/4
    assert teacher_attention_distance(model, ids, skip_sink=True)[0, 0].item() == pytest.approx((T - 2) / 4, rel=1e-4)


@torch.no_grad()
def test_gdn_decays_from_the_teacher_heads_attention_distance(tiny, ids):
    model, shape = tiny
    init = GDNInit(decay="distance", tau_min=1.0, tau_max=1e4)
    tau = teacher_head_tau(model, ids, init)
    assert torch.allclose(tau, tau_for_distance(teacher_attention_distance(model, ids), ids.shape[1], 1.0, 1e4))
    assert teacher_head_tau(model, ids, GDNInit(decay="spread")) is None
    out = convert(copy.deepcopy(model), parse_variant("head:3:1").plan(shape), init=init, head_tau=tau)
    for i, layer in enumerate(decoder_layers(out)):
        attn = layer.self_attn.attn
        g, _ = attn.gdn.gates(torch.randn(1, 3, shape.hidden))
        la = list(attn.split.la_heads)
        assert torch.allclose(-1 / g[0, 0], tau[i, la], rtol=1e-3)  # per head: decay exp(-1/tau)
    with pytest.raises(ValueError, match="decay"):
        GDNInit(decay="nope")


@torch.no_grad()
def test_least_squares_gammas_fit_the_teacher_heads(tiny, ids):
    """With calibration tokens every head's gamma is the least-squares scale onto the teacher head's output
    (each layer fed the teacher's inputs): the residual is orthogonal to the head's output, and the layer's
    error is below that of the teacher-RMS gammas and of a silent layer."""
    model, shape = tiny
    plan = parse_variant("head:3:1").plan(shape)
    fitted = convert(copy.deepcopy(model), plan, calibration_ids=ids)
    by_rms = convert(copy.deepcopy(model), plan, teacher_head_rms(model, ids), GDNInit(gamma="rms"))
    io = teacher_attention_io(model, ids)
    for i in range(shape.n_layers):
        x, position_embeddings, target = io[i]
        errors = []
        for converted_model in (fitted, by_rms):
            out = head_outputs(decoder_layers(converted_model)[i].self_attn.attn, x, position_embeddings)
            errors.append((out - target).pow(2).sum().item())
            if converted_model is fitted:
                dot = ((target - out) * out).sum(dim=(0, 1, 3))
                assert dot.abs().max() < 1e-4 * out.pow(2).sum(dim=(0, 1, 3)).max()
        assert errors[0] <= errors[1] and errors[0] < target.pow(2).sum().item()


def test_head_outputs_are_the_same_through_the_fused_glue(tiny, ids):
    """The fused glue applies o_proj's weight itself (no o_proj call a hook could see), as on the GPU: the head
    outputs the gamma fit reads must not depend on the glue (they raised IndexError on the H200)."""
    model, shape = tiny
    converted = convert(copy.deepcopy(model), parse_variant("head:3:1").plan(shape))
    x, position_embeddings, _ = teacher_attention_io(model, ids)[0]
    hydra = decoder_layers(converted)[0].self_attn.attn
    reference = head_outputs(hydra, x, position_embeddings)
    hydra.glue = "fused"
    assert torch.allclose(head_outputs(hydra, x, position_embeddings), reference)
    assert hydra.glue == "fused"


@torch.no_grad()
def test_fitted_gammas_scale_the_same_heads_through_the_fused_glue(tiny, ids):
    """The fit reads head outputs through the reference glue and keeps gammas in the original head order; the fused
    glue (the GPU's, here with its torch twins) folds them in kernel order into o_proj's columns. With a shuffled,
    uneven head map the converted model gives the same logits through both glues: each gamma scales its own head."""
    model, shape = tiny
    plan = parse_variant("head:3:1:random:2").plan(shape)
    student = convert(copy.deepcopy(model), plan, calibration_ids=ids)
    hydras = [layer.self_attn.attn for layer in decoder_layers(student)]
    assert any(hydra.reorders_heads for hydra in hydras)
    reference = student(ids).logits
    for hydra in hydras:
        hydra.glue = "fused"
    assert torch.allclose(student(ids).logits, reference, atol=1e-5)
