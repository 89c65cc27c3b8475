"""The GPU paths of converted models and head selection: cuDNN/flash SDPA and fla's kernels against the torch
references. CI has no GPU, so these skip there; they run on the device machine (docs/methods.md, "GPU paths")."""

import copy
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import handwired  # noqa: E402  (tests/ is on sys.path)

from hhbench.kernels import registry  # noqa: E402
from hhbench.models.convert import (  # noqa: E402
    GDNInit,
    HydraAdapter,
    cache_kwarg,
    convert,
    decoder_layers,
    head_outputs,
    teacher_attention_io,
    teacher_head_rms,
    teacher_head_tau,
)
from hhbench.models.variants import parse_variant  # noqa: E402
from tests.test_gdn_reference import rel  # noqa: E402
from tests.test_select_heads import _argmax  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla (the gpu extra)"),
    pytest.mark.filterwarnings("ignore"),
]

BF16_REL = 3e-2  # bf16 activations through 4 layers: the reference runs in fp32


@pytest.fixture(scope="module")
def llama():
    """A random Llama with SmolLM2's head size (64) and GQA, on the GPU in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hhbench.models import loader

    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().cuda()
    shape = loader.shape_from_config_dict(config.to_dict(), "gpu-test")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1)).cuda()
    return model, shape, ids


def converted(llama, variant: str, dtype, fa_backend="auto", gdn_backend="auto"):
    model, shape, ids = llama
    rms = teacher_head_rms(model, ids)
    plan = parse_variant(variant).plan(shape)
    return convert(copy.deepcopy(model), plan, rms, fa_backend=fa_backend, gdn_backend=gdn_backend).to(dtype)


def test_auto_resolves_to_the_gpu_kernels():
    assert registry.resolve("auto", registry.GDN, "cuda", "prefill").name == "fla-chunk"  # no point: unrestricted
    assert registry.resolve("auto", registry.GDN, "cuda", "decode").name == "fla-recurrent"
    assert registry.resolve("auto", registry.FA, "cuda", "prefill", "bf16").name == "sdpa-cudnn"
    assert registry.resolve("auto", registry.FA, "cuda", "prefill", "fp32").name == "sdpa-efficient"
    qla = registry.get("flash-qla", registry.GDN).unavailable("cuda") is None
    for pass_ in ("prefill", "train"):
        chosen = registry.resolve("auto", registry.GDN, "cuda", pass_, "bf16", 128).name
        assert chosen == ("flash-qla" if qla else "fla-chunk")
        assert registry.resolve("auto", registry.GDN, "cuda", pass_, "fp32", 128).name == "fla-chunk"


needs_flash_qla = pytest.mark.skipif(
    importlib.util.find_spec("flash_qla") is None, reason="needs flash_qla (FlashQLA, an SM90/SM100/SM120 GPU)"
)


def _gdn_case(T=1000, H=4, d=128, B=1):
    """bf16 q, k, v and fp32 decay and beta as the layer hands them over; 1000 tokens: not a multiple of 64."""
    from tests.test_gdn_reference import gdn_inputs

    q, k, v, g, beta = gdn_inputs(B, T, H, d, d, dtype=torch.float32)
    return [
        t.cuda().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_()
        for i, t in enumerate((q, k, v, g, beta))
    ]


@needs_flash_qla
@pytest.mark.parametrize("batch", [1, 2])
def test_flash_qla_matches_fla_chunk_outputs_and_gradients(batch):
    """FlashQLA against fla's own Triton chunk path (pinned) and both against the fp32 torch chunked reference,
    outputs, final states and the gradients of q, k, v, g and beta. Batch 1 takes FlashQLA's intra-card CP."""
    from hhbench.kernels.reference import gdn_chunk

    inputs = _gdn_case(B=batch)
    grad_out = torch.randn_like(inputs[2])
    results = {}
    for name in ("flash-qla", "fla-chunk"):
        o, state = registry.get(name, registry.GDN).prefill(*inputs, output_final_state=True)
        grads = torch.autograd.grad(o, inputs, grad_out)
        results[name] = (o, state, grads)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, state_ref = gdn_chunk(*wide, 64, output_final_state=True)
    grads_ref = torch.autograd.grad(o_ref, wide, grad_out.double())
    (o_q, s_q, g_q), (o_f, s_f, g_f) = results["flash-qla"], results["fla-chunk"]
    assert rel(o_q, o_f) < 2e-2 and rel(s_q, s_f) < 2e-2
    assert rel(o_q, o_ref) < 2e-2 and rel(o_f, o_ref) < 2e-2
    for name, a, b in zip("q k v g beta".split(), g_q, g_f, strict=True):
        assert rel(a, b) < 5e-2, name

    def flat(grads):  # all gradients as one vector, as the sweep's check compares them
        return torch.cat([t.double().flatten() for t in grads])

    assert rel(flat(g_q), flat(grads_ref)) < 5e-2 and rel(flat(g_f), flat(grads_ref)) < 5e-2


@needs_flash_qla
def test_flash_qla_with_the_q_k_l2_norm_matches_its_own_norm_and_the_reference():
    """use_qk_l2norm_in_kernel through flash-qla (fla's L2 norm, then FlashQLA without its own) against FlashQLA with
    its own norm and against the fp32 torch chunked reference on normalized q and k: outputs and the gradients of
    unnormalized q and k (and v, g, beta), as a layer's call takes them."""
    import flash_qla

    from hhbench.kernels.reference import gdn_chunk

    q, k, v, g, beta = _gdn_case()
    q, k = (t.detach().mul(3).requires_grad_() for t in (q, k))  # not normalized: the norm is the backend's
    inputs = (q, k, v, g, beta)
    grad_out = torch.randn_like(v)
    o, _ = registry.get("flash-qla", registry.GDN).prefill(*inputs, use_qk_l2norm_in_kernel=True)
    grads = torch.autograd.grad(o, inputs, grad_out)
    o_own, _ = flash_qla.chunk_gated_delta_rule(*inputs, use_qk_l2norm_in_kernel=True)
    grads_own = torch.autograd.grad(o_own, inputs, grad_out)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, _ = gdn_chunk(*(torch.nn.functional.normalize(t, dim=-1) for t in wide[:2]), *wide[2:], 64)
    grads_ref = torch.autograd.grad(o_ref, wide, grad_out.double())
    assert rel(o, o_own) < 2e-2 and rel(o, o_ref) < 2e-2
    for name, a, b, c in zip("q k v g beta".split(), grads, grads_own, grads_ref, strict=True):
        assert rel(a, b) < 5e-2 and rel(a, c) < 5e-2, name


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_fla_chunk_at_flas_smaller_chunks_matches_the_reference(chunk_size):
    """fla 0.6 takes chunks of 16 and 32 too (fla-chunk hands chunk_size on): outputs and final state against the fp64
    torch chunked reference at the same chunk size, as at 64 above; the gradients of q, k, v, g and beta too, except
    where fla sends the backward to TileLang at chunks of 16, which TileLang does not build: fla-chunk refuses that."""
    from hhbench.errors import Unsupported
    from hhbench.kernels.gdn import fla_tilelang_backward
    from hhbench.kernels.reference import gdn_chunk

    inputs = _gdn_case()
    grad_out = torch.randn_like(inputs[2])
    fla_chunk = registry.get("fla-chunk", registry.GDN)
    with torch.no_grad():
        o, state = fla_chunk.prefill(*inputs, output_final_state=True, chunk_size=chunk_size)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, state_ref = gdn_chunk(*wide, chunk_size, output_final_state=True)
    assert rel(o, o_ref) < 2e-2 and rel(state, state_ref) < 2e-2
    if chunk_size == 16 and fla_tilelang_backward():
        with pytest.raises(Unsupported, match="TileLang does not build it for 16-token chunks"):
            fla_chunk.prefill(*inputs, chunk_size=chunk_size)
        return
    o, _ = fla_chunk.prefill(*inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad(o, inputs, grad_out)
    grads_ref = torch.autograd.grad(o_ref, wide, grad_out.double())
    flat = [torch.cat([t.double().flatten() for t in g]) for g in (grads, grads_ref)]
    assert rel(*flat) < 5e-2


@needs_flash_qla
def test_fla_chunk_never_reaches_flash_qla(monkeypatch):
    """With flash_qla installed fla 0.6 dispatches chunk_gated_delta_rule to it; fla-chunk's pin keeps it out."""
    import flash_qla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def refuse(*args, **kwargs):
        raise AssertionError("FlashQLA was called")

    monkeypatch.setattr(flash_qla, "chunk_gated_delta_rule", refuse)
    monkeypatch.delenv("FLA_FLASH_QLA", raising=False)
    inputs = [t.detach() for t in _gdn_case()]
    registry.get("fla-chunk", registry.GDN).prefill(*inputs)  # pinned: fla's Triton path
    with pytest.raises(AssertionError, match="FlashQLA was called"):  # unpinned: fla would have sent it to FlashQLA
        chunk_gated_delta_rule(*inputs)


def _fla_kernels() -> dict[str, tuple[frozenset, int]]:
    """The Triton kernels of fla's imported modules that have compiled on this GPU: name -> (the tuning keys its
    autotuner has tuned or loaded so far in this process, how many binaries it has compiled)."""
    import sys

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = {}
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("fla.") and m is not None]
    for value in [v for module in modules for v in vars(module).values()]:
        tuner = None
        for _ in range(4):  # triton.heuristics -> autotuner -> jit function
            tuner = value if isinstance(value, Autotuner) else tuner
            if isinstance(value, JITFunction):
                compiled = sum(len(caches[0]) for caches in value.device_caches.values())
                if compiled:
                    found[f"{value.fn.__module__}.{value.fn.__name__}"] = (
                        frozenset(tuner.cache if tuner else ()),
                        compiled,
                    )
                break
            value = getattr(value, "fn", None)
    return found


L2NORM = "fla.modules.norm.l2norm.l2norm_fwd_kernel"


@torch.no_grad()
def test_fla_chunk_compiles_anew_at_a_new_context_only_for_its_in_kernel_l2norm_bucket():
    """fla's chunk kernels take T at run time (do_not_specialize) and tune on head counts and sizes: a new context
    length compiles nothing. Only the q/k L2 norm of use_qk_l2norm_in_kernel (the fused layer's path) does, and
    only for a new token bucket: fla's l2norm_fwd passes NB = cdiv(B*T*H, 65536) as a tl.constexpr in its tuning
    key (fla/modules/norm/l2norm.py, lines 63-69 and 129-136). H=4: 40960 and 45000 tokens are one bucket (NB 3)."""
    fla_chunk = registry.get("fla-chunk", registry.GDN)

    def run(T, in_kernel_norm):
        fla_chunk.prefill(*(t.detach() for t in _gdn_case(T)), use_qk_l2norm_in_kernel=in_kernel_norm)
        torch.cuda.synchronize()
        return _fla_kernels()

    first = run(1024, True)  # every kernel of the path compiled and tuned (NB 1)
    assert run(40960, False) == first  # a new context, q and k normalized outside (kernel scope): nothing new
    bucket = run(40960, True)
    changed = {name for name, kernel in bucket.items() if kernel != first.get(name)}
    assert changed <= {L2NORM}, changed
    new_keys = bucket[L2NORM][0] - first[L2NORM][0]
    assert {key[:2] for key in new_keys} <= {(128, 3)}  # D, NB
    assert run(45000, True) == bucket  # another context in the same bucket: nothing new


def _layer_points(gdn_backend: str):
    from hhbench.plan.grid import grid_points

    grid = {"models": "qwen3-1.7b", "layouts": "head,layer", "ratios": "7:1,3:1", "contexts": "4k",
            "passes": "prefill,train", "scopes": "layer", "gdn_backend": gdn_backend}  # fmt: skip
    decode = {**grid, "passes": "decode", "gdn_backend": "auto"}
    return grid_points(grid, "cuda") + (grid_points(decode, "cuda") if gdn_backend == "fla-chunk" else [])


@pytest.mark.parametrize("gdn_backend", ["fla-chunk", pytest.param("flash-qla", marks=needs_flash_qla)])
def test_layer_points_run_with_their_floor_training_included(gdn_backend):
    """Every layer point of the Qwen3-1.7B shape at 4K runs (training too: on Hopper with Triton < 3.7.1 fla needs
    TileLang for the backward, FlashQLA brings its own) and gets its floor, fla's Triton conv inside."""
    from hhbench.measure.timing import TimingPolicy
    from hhbench.runner.point import measure_point

    policy = TimingPolicy(warmup_ms=5, target_ms=20, min_reps=3, max_reps=5)
    for point in _layer_points(gdn_backend):
        row = measure_point(point, torch.device("cuda"), policy, {})
        where = f"{row.variant} {row.pass_}"
        assert row.status == "ok", f"{where}: {row.reason}"
        assert row.floor_ms > 0 and "floor_error" not in row.extra, where
        assert row.vs_floor == pytest.approx(row.latency_ms / row.floor_ms), where
        assert row.gdn_impl, where
        # the lower of the parts' medians summed and all of them back to back (one graph in decode, else eagerly)
        ways = row.extra["floor_ways_ms"]
        together = "every part back to back, " + ("one CUDA graph" if row.pass_ == "decode" else "eagerly")
        assert set(ways) == {"the parts' medians summed", together}, where
        assert row.floor_ms == pytest.approx(min(ways.values())), where
        if gdn_backend == "flash-qla":
            assert row.gdn_impl.startswith("flash_qla"), where


def test_graph_timing_captures_prefill_and_training_steps_with_either_mode():
    """[timing] graph = true (sweep --graph) on steps only decode was captured in before: prefill and training
    (autograd's backward inside the capture), sequential and on two streams, at layer and kernel scope; timed as
    replays (timer cuda-graph), no host time, the floor the lower of its parts' graphs summed and all of them
    as one graph."""
    from hhbench.measure.timing import TimingPolicy
    from hhbench.plan.grid import grid_points
    from hhbench.runner.point import measure_point

    grid = {"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "1k", "passes": "prefill,train",
            "scopes": ["kernel", "layer"], "modes": ["sequential", "streams"]}  # fmt: skip
    policy = TimingPolicy(warmup_ms=5, target_ms=20, min_reps=3, max_reps=5, graph=True)
    for point in grid_points(grid, "cuda"):
        row = measure_point(point, torch.device("cuda"), policy, {})
        where = f"{row.variant} {row.pass_} {row.scope} {row.mode}"
        assert row.status == "ok", f"{where}: {row.reason}"
        assert row.timer == "cuda-graph" and "host_ms" not in row.extra, where
        if row.scope == "layer":  # both ways of timing the floor's parts, the lower of them the floor
            assert row.floor_ms == pytest.approx(min(row.extra["floor_ways_ms"].values())), where


def test_a_profiled_training_layer_traces_its_backward_kernels_to_the_layers_functions():
    """On CUDA autograd runs the backward on a thread of its own, without Python frames: its kernels are traced
    through their autograd nodes to the forward's hhbench functions ("... backward")."""
    from hhbench.measure.timing import TimingPolicy
    from hhbench.plan.grid import grid_points
    from hhbench.runner.point import measure_point

    grid = {"models": "qwen3-1.7b", "layouts": "head", "ratios": "7:1", "contexts": "4k", "passes": "train",
            "scopes": "layer", "gdn_backend": "fla-chunk", "profile": True}  # fmt: skip
    [point] = grid_points(grid, "cuda")
    row = measure_point(
        point, torch.device("cuda"), TimingPolicy(warmup_ms=5, target_ms=20, min_reps=3, max_reps=5), {}
    )
    assert row.status == "ok" and "profile_error" not in row.extra, row.extra.get("profile_error")
    sites = {site: ms for k in row.extra["kernels"]["top"] for site, ms in k["sites"]}
    assert any(site.startswith("hhbench/layers/") and site.endswith(" backward") for site in sites), sites


@pytest.mark.parametrize("pass_", ["prefill", "decode"])
def test_a_profiled_layer_lists_its_cuda_kernels_and_the_floors_share(pass_):
    """sweep --profile on the GPU: CUDA kernels (not CPU operators) per layer, their sum within the profiled step
    and, or else the host time to issue the step, covering most of a 4K prefill's latency, the projections' GEMMs
    attributed to the floor parts, decode profiled eagerly (its latency is a graph replay of the same kernels)."""
    from hhbench.measure.timing import TimingPolicy
    from hhbench.plan.grid import grid_points
    from hhbench.runner.point import measure_point

    grid = {"models": "qwen3-1.7b", "layouts": "head,layer", "ratios": "7:1,3:1", "contexts": "4k", "passes": pass_,
            "scopes": "layer", "profile": True}  # fmt: skip
    policy = TimingPolicy(warmup_ms=5, target_ms=20, min_reps=3, max_reps=5)
    for point in grid_points(grid, "cuda")[::3]:  # head 7:1 and layer 3:1
        row = measure_point(point, torch.device("cuda"), policy, {})
        where = f"{row.variant} {row.pass_}"
        assert row.status == "ok" and "profile_error" not in row.extra, f"{where}: {row.extra.get('profile_error')}"
        kernels, shares = row.extra["kernels"], row.extra["kernel_shares"]
        assert kernels["activity"] == "cuda" and not any(k["name"].startswith("aten::") for k in kernels["top"])
        assert 0 < kernels["kernel_ms"] <= kernels["step_ms"], where
        assert ("note" in kernels) == (pass_ == "decode"), where
        if pass_ == "prefill":  # the latency is its kernels', or the host's that issues them (head 7:1 at 4K on
            # the H200: 0.59 ms of kernels, 2.68 ms latency, 2.4 ms to issue: host-bound)
            explained = max(kernels["kernel_ms"], row.extra["host_ms"])
            assert explained >= 0.5 * row.latency_ms, f"{where}: host {row.extra['host_ms']:.3g} ms"
        assert shares["floor"] > 0 and sum(shares.values()) == pytest.approx(1), where
        # the output projection's GEMM (GEMV in decode) found by name among the floor parts' kernels
        assert any("o_proj" in k["parts"] and k["kind"] != "rest" for k in kernels["top"]), where
        # kernels traced through their operators to the layer's functions (the projections' GEMMs at least)
        sites = {site for k in kernels["top"] for site, _ in k["sites"]}
        assert any(site.startswith("hhbench/layers/hydrahead.py") for site in sites), f"{where}: {sites}"


@pytest.mark.parametrize("variant", ["head:3:1", "head:3:1:random:2", "layer:3:1", "head:1:0"])
@torch.no_grad()
def test_converted_model_on_gpu_kernels_matches_the_reference(llama, variant):
    """300 tokens (not a multiple of fla's chunk of 64): bf16 on cuDNN + fla against fp32 on math SDPA +
    the torch chunked GDN."""
    _, _, ids = llama
    fast = converted(llama, variant, torch.bfloat16)
    ref = converted(llama, variant, torch.float32, "sdpa-math", "torch-chunk")
    assert any(isinstance(layer.self_attn, HydraAdapter) for layer in decoder_layers(fast))
    assert rel(fast(ids).logits, ref(ids).logits) < BF16_REL


# A fitted gamma's error, in units of its head's scale |t| / |o| (the teacher head's output norm over the head's
# own at gamma 1: the gamma of a head that follows its teacher head exactly). A relative error e in the head's
# outputs moves gamma = <o, t> / |o|^2 by at most 3 e |t| / |o| (first order, Cauchy-Schwarz) however well the head
# follows its teacher, where a plain rtol fails heads whose gamma is near 0. fp32: fla's chunk kernel rounds the
# fp32 operands of its dots to TF32 (unit roundoff 2^-11); 5e-3 allows e = 1.7e-3, and the torch chunk form with
# TF32-rounded matmul operands on the CPU gave at most 6e-5. bf16 (teacher, student and gamma itself in bf16,
# unit roundoff 2^-8): the torch references in bf16 on the CPU gave up to 1.0e-2; 3e-2. Two heads' gammas in one
# layer here differ by 1.1e-2 or more: in fp32 a gamma fitted onto another head fails.
GAMMA_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def gamma_scale(hydra, x, position_embeddings, target) -> torch.Tensor:
    """[heads]: |t| / |o| per head, o the head's output at gamma 1 and t its teacher head's [B, T, heads, d]."""
    at_one = copy.deepcopy(hydra)
    at_one.head_gamma.fill_(1.0)
    o = head_outputs(at_one, x, position_embeddings)
    return target.float().pow(2).sum(dim=(0, 1, 3)).sqrt() / o.float().pow(2).sum(dim=(0, 1, 3)).sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_init_from_teacher_statistics_on_gpu_kernels_matches_the_reference(llama, dtype):
    """The default init (decays from the teacher's attention distance, least-squares gammas) fitted on auto's GPU
    kernels (fla's chunk; cuDNN attention in bf16, SDPA's memory-efficient kernel in fp32, which cuDNN does not
    take) gives, head by head in the original head order both layers keep them in, the gammas that the fp32 torch
    references give."""
    model, shape, ids = llama
    plan = parse_variant("head:3:1").plan(shape)
    tau = teacher_head_tau(model, ids, GDNInit())
    fast = convert(copy.deepcopy(model).to(dtype), plan, head_tau=tau, calibration_ids=ids)
    ref = convert(copy.deepcopy(model), plan, None, GDNInit(), "sdpa-math", "torch-chunk", tau, ids)
    io = teacher_attention_io(model, ids)
    for i, (a, b) in enumerate(zip(decoder_layers(fast), decoder_layers(ref), strict=True)):
        fitted, expected = a.self_attn.attn.head_gamma.float(), b.self_attn.attn.head_gamma
        scale = gamma_scale(b.self_attn.attn, *io[i])
        error = (fitted - expected).abs() / scale
        h = int(error.argmax())
        assert error[h] <= GAMMA_TOL[dtype], (
            f"layer {i} head {h}: gamma {fitted[h]:.6g} on the GPU kernels, {expected[h]:.6g} on the references: "
            f"|difference| {error[h]:.3g} x the head's scale {scale[h]:.4g} > tolerance {GAMMA_TOL[dtype]}"
        )


@pytest.mark.parametrize("variant", ["head:3:1", "layer:3:1"])
@torch.no_grad()
def test_cached_decoding_on_gpu_kernels_follows_the_full_forward(llama, variant):
    """Prefill 200 tokens into the cache (fla chunk with its final state), then 10 steps one token at a time
    (flash SDPA over the FA cache, fla's fused recurrent step): each step's logits match the full forward's."""
    from transformers import DynamicCache

    _, _, ids = llama
    fast = converted(llama, variant, torch.bfloat16)
    full = fast(ids[:, :210]).logits
    cache = DynamicCache(config=fast.config)
    by_name = {cache_kwarg(fast): cache}
    first = fast(ids[:, :200], **by_name, use_cache=True).logits
    steps = torch.cat([fast(ids[:, t : t + 1], **by_name, use_cache=True).logits for t in range(200, 210)], dim=1)
    assert rel(first, full[:, :200]) < BF16_REL
    assert rel(steps, full[:, 200:210]) < BF16_REL
    generated = fast.generate(ids[:, :64], max_new_tokens=8, do_sample=False, use_cache=True)
    assert generated.shape == (1, 72) and torch.equal(generated[:, :64], ids[:, :64])


def test_head_selection_on_gpu_ranks_the_hand_wired_copy_head_first():
    from hhbench.select.probes import make_probes
    from hhbench.select.scores import score_model

    tok = handwired.tokenizer()
    probes = make_probes(lambda text: tok.encode(text, add_special_tokens=False), [400, 600], 2, seed=0)
    cpu = score_model(handwired.model(), probes)
    gpu = score_model(handwired.model().cuda(), probes)
    assert _argmax(gpu.combined) == handwired.COPY_HEAD
    for name in ("retrieval", "patching", "combined"):
        assert torch.allclose(torch.tensor(getattr(gpu, name)), torch.tensor(getattr(cpu, name)), atol=1e-3)


@pytest.mark.parametrize("segments", [1, 7, 66])
def test_split_kv_decode_on_the_flash_kernel_matches_math_sdpa(segments):
    from hhbench.kernels.split_kv import split_kv_decode

    q = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 32768 + 5, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    expected = registry.get("sdpa-math", registry.FA).decode(q.float(), k.float(), v.float())
    assert rel(split_kv_decode(q, k, v, segments), expected) < 1e-2


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fla_recurrent_step_takes_raw_gates_as_the_torch_reference(dtype, batch):
    """fla's fused recurrent step with the decay gate and beta's sigmoid in its kernel (a and b raw: views of one
    projection row, strided for two sequences, as the fused decode passes them; A_log and dt_bias in the layer's
    dtype), and with the gates precomputed, against the torch reference's step in fp32 on the same rounded inputs
    with the gates written out: the outputs (bf16: within its rounding) and the new state."""
    from tests.test_backends import gates_written_out, raw_gate_case

    q, k, v, a, b, state, A_log, dt_bias = (t.cuda() for t in raw_gate_case(batch, 4, 128, torch.float32))
    q, k, v, A_log, dt_bias = (t.to(dtype) for t in (q, k, v, A_log, dt_bias))
    projection = torch.cat([a, b, torch.zeros_like(a)], 1).to(dtype)
    a, b = projection[:, :4], projection[:, 4:8]
    g, beta = (t.float() for t in gates_written_out(a, b, A_log, dt_bias))
    o, expected_state = registry.get("torch-recurrent", registry.GDN).step(
        *(t.float() for t in (q, k, v)), g, beta, state
    )
    fla = registry.get("fla-recurrent", registry.GDN)
    raw = fla.step(
        q, k, v, a, b, state, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True
    )
    for o_fla, state_fla in (raw, fla.step(q, k, v, g, beta, state)):
        assert o_fla.dtype == dtype and rel(o_fla, o) < (1e-4 if dtype == torch.float32 else 1e-2)
        assert rel(state_fla, expected_state) < 1e-4


@pytest.mark.parametrize("name", ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flash-attn", "flex"])
def test_every_fa_backend_answers_a_one_token_prefill_with_its_gradients(name):
    """A one-token prompt or a context-1 training point: each FA backend's prefill returns the value (GQA: 4 query
    heads on 2 KV heads) and gives q, k and v their gradients (q's and k's zero), as the CPU tests check for SDPA's."""
    backend = registry.get(name, registry.FA)
    if backend.unavailable("cuda"):
        pytest.skip(backend.unavailable("cuda"))
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 1, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = backend.prefill(q, k, v)
    assert out.shape == q.shape and rel(out, v.repeat_interleave(2, dim=2)) < 1e-2
    grad_q, grad_k, grad_v = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert grad_q.abs().max() < 1e-2 and grad_k.abs().max() < 1e-2 and rel(grad_v, torch.full_like(v, 2.0)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_select_slots_on_cuda_is_index_select_and_replays_in_a_graph(dtype):
    """The gather by 8-byte words on CUDA: values and gradients (slots taken twice: two addends sum the same in
    either order) bit-equal index_select's, on a projection's slots, an odd offset (by elements) and memory that
    starts one element (not one word) off an 8-byte bound (DLPack's; by words it would fault; two bytes off, an fp32
    tensor is misaligned for every CUDA kernel, index_select's and the copy's too); captured in a CUDA graph and
    replayed on new values, the same (the index is made before capture, nothing syncs)."""
    from hhbench.layers.hydrahead import _as_words, select_slots

    index = torch.tensor([5, 5, 2, 40, 47, 0], device="cuda")
    projection = torch.randn(2, 33, 64 * 7 + 4, device="cuda").to(dtype)
    size = projection.element_size()
    raw = torch.empty((projection.numel() + 1) * size, dtype=torch.uint8, device="cuda")[size:]
    unaligned = torch.from_dlpack(raw).view(dtype).view(projection.shape)
    unaligned.copy_(projection)
    views = {"projection": lambda p: p[..., : 48 * 8].unflatten(-1, (48, 8)),
             "odd offset": lambda p: p[..., 1 : 1 + 48 * 8].unflatten(-1, (48, 8))}  # fmt: skip
    for base in (projection, unaligned):
        for name, view in views.items():
            assert (_as_words(view(base)) is not None) == (base is projection and name == "projection"), name
            leaf, expected_leaf = base.detach().clone().requires_grad_(), base.detach().clone().requires_grad_()
            got, expected = select_slots(view(leaf), index), view(expected_leaf).index_select(2, index)
            assert torch.equal(got, expected), name
            grad = torch.randn_like(got)
            got.backward(grad)
            expected.backward(grad)
            assert torch.equal(leaf.grad, expected_leaf.grad), name
            assert torch.equal(select_slots(view(base), index), expected), name
    static = projection.clone()
    select_slots(views["projection"](static), index)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_slots(views["projection"](static), index)
    static.copy_(torch.randn_like(static))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, views["projection"](static).index_select(2, index))


def _kernel_within_twin(results: dict, fp32: float) -> None:
    """results[("kernel" or "twin", dtype)]: a kernel's outputs and its torch twin's in fp32, bf16 and fp64 from the
    same values. The kernel's fp32 outputs are the fp32 twin's within `fp32`, its bf16 ones within bf16's rounding of
    the fp32 twin's (1e-2), its fp64 ones the fp64 twin's to 1e-12."""
    for dtype, twin_dtype, tol in ((torch.float32, torch.float32, fp32), (torch.bfloat16, torch.float32, 1e-2),
                                   (torch.float64, torch.float64, 1e-12)):  # fmt: skip
        for kernel, twin in zip(results["kernel", dtype], results["twin", twin_dtype], strict=True):
            assert rel(kernel, twin) < tol, (dtype, rel(kernel, twin))


@pytest.mark.parametrize("tokens, start", [(4099, 0), (1, 70000)])
def test_slot_norm_rope_kernel_matches_its_torch_twin_and_replays_in_a_graph(tokens, start):
    """hhbench's slot_norm_rope kernel (slot_prep.py) against glue.TORCH's twin on the plan of a Qwen3-1.7B head 7:1
    layer (GQA, q/k norms), from strided slots of a projection: fp32 to rounding, bf16 within bf16's rounding of the
    fp32 twin, fp64 in fp64 (it computed in fp32); then captured in a CUDA graph and replayed on new inputs (decode
    runs it so)."""
    from hhbench.layers import glue, slot_prep
    from hhbench.layers.hydrahead import HydraAttention, rope_table

    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots = len(layer.fused_rows) // 128
    torch.manual_seed(0)
    projection = torch.randn(2, tokens, n_slots * 128 + 64, device="cuda")
    weight = 1 + 0.3 * torch.randn(2, 128, device="cuda")
    for plan in layer.slot_plans.values():
        results = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            slots = projection.to(dtype)[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
            cos, sin = (t[start : start + tokens] for t in rope_table(start + tokens, 128, 1e6, "cuda", dtype))
            for name, op in (("kernel", slot_prep.slot_norm_rope), ("twin", glue.slot_norm_rope)):
                results[name, dtype] = op(slots, plan, weight.to(dtype), 1e-6, cos, sin)
        assert all(t.dtype == torch.bfloat16 for t in results["kernel", torch.bfloat16])
        _kernel_within_twin(results, fp32=1e-6)
    slots = projection[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
    cos, sin = (t[start : start + tokens] for t in rope_table(start + tokens, 128, 1e6, "cuda", torch.float32))
    plan = layer.slot_plans[True]
    slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)  # compiled and its plan on the GPU before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    projection.normal_()
    graph.replay()
    for got, want in zip(captured, glue.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin), strict=True):
        assert rel(got, want) < 1e-6


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp32", "bf16-into-fp32"],
)
def test_slot_norm_rope_kernel_writes_the_kv_cache_and_replays_in_a_graph(dtype, cache_dtype):
    """hhbench's slot_norm_rope kernel on the decode plan of a Qwen3-1.7B head 7:1 layer (FA q, k and v of two KV
    groups, the GDN heads' q, k and v joined), two sequences, its FA k and v parts written into KV cache slices
    [2, 1, 2, 128] at position 37 of [2, 64, 2, 128] buffers (strided over sequences and tokens), as a decode step
    writes them: the twin's values (its parts copied into caches alike), the slices themselves returned, the caches'
    other tokens untouched; an fp32 cache of bf16 slots (autocast's) holds bf16 values, as the twin's copies do;
    then captured in a CUDA graph at that position and replayed on new inputs: the twin's parts, the cache slices
    holding the new k and v."""
    from hhbench.layers import glue, slot_prep
    from hhbench.layers.hydrahead import HydraAttention, rope_table

    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots, plan, position = len(layer.fused_rows) // 128, layer.slot_plans[True], 37
    assert plan.sizes[:3] == (2, 2, 2) and plan.n_rope == 4
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the two round fp32 results to bf16 apart
    torch.manual_seed(0)
    projection = torch.randn(2, 1, n_slots * 128 + 64, device="cuda").to(dtype)
    slots = projection[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
    weight = (1 + 0.3 * torch.randn(2, 128, device="cuda")).to(dtype)
    cos, sin = (t[position : position + 1] for t in rope_table(position + 1, 128, 1e6, "cuda", dtype))

    def caches():
        k, v = (torch.full((2, 64, 2, 128), 7.0, device="cuda", dtype=cache_dtype) for _ in range(2))
        return (k, v), {1: k[:, position : position + 1], 2: v[:, position : position + 1]}

    results = {}
    for name, op in (("kernel", slot_prep.slot_norm_rope), ("twin", glue.slot_norm_rope)):
        buffers, into = caches()
        parts = op(slots, plan, weight, 1e-6, cos, sin, into=into)
        assert parts[1] is into[1] and parts[2] is into[2]
        for cache in buffers:
            assert (cache[:, :position] == 7).all() and (cache[:, position + 1 :] == 7).all()
        results[name] = parts
    for p, (got, want) in enumerate(zip(results["kernel"], results["twin"], strict=True)):
        assert got.dtype == (cache_dtype if p in (1, 2) else dtype) and rel(got, want) < tol
        assert torch.equal(got, got.to(dtype).to(got.dtype))
    (k, v), into = caches()
    slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin, into=into)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin, into=into)
    projection.normal_()
    graph.replay()
    torch.cuda.synchronize()
    want = glue.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    for got, expected in zip(captured, want, strict=True):
        assert rel(got, expected) < tol
    assert rel(k[:, position], want[1][:, 0]) < tol and rel(v[:, position], want[2][:, 0]) < tol
    assert (k[:, position + 1 :] == 7).all() and (v[:, :position] == 7).all()


def test_slot_norm_rope_kernel_offsets_beyond_int32():
    """The kernel's offsets past 2^31 elements: a 600K-token bf16 prefill of the Qwen3-1.7B head 7:1 plan reads slots
    2.5e9 elements into the projection and writes parts 3.5e9 elements into its buffer; its first and last tokens
    against the twin's of the same tokens (int32 offsets would wrap and fault or read other memory)."""
    from hhbench.layers import glue, slot_prep
    from hhbench.layers.hydrahead import HydraAttention, rope_table

    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots, tokens, plan = len(layer.fused_rows) // 128, 600_000, layer.slot_plans[False]
    assert tokens * (n_slots * 128 + 64) > 2**31 and tokens * len(plan.sources) * 128 > 2**31
    torch.manual_seed(0)
    projection = torch.randn(1, tokens, n_slots * 128 + 64, device="cuda", dtype=torch.bfloat16)
    slots = projection[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
    weight = (1 + 0.3 * torch.randn(2, 128, device="cuda")).to(torch.bfloat16)
    cos, sin = (t[:tokens] for t in rope_table(tokens, 128, 1e6, "cuda", torch.bfloat16))
    parts = slot_prep.slot_norm_rope(slots, plan, weight, 1e-6, cos, sin)
    for ends in (slice(0, 3), slice(tokens - 3, tokens)):
        twin = glue.slot_norm_rope(slots[:, ends], plan, weight, 1e-6, cos[ends], sin[ends])
        for part, expected in zip(parts, twin, strict=True):
            assert rel(part[:, ends], expected) < 1e-2


def _slot_conv_inputs(tokens: int, batch: int, dtype):
    """A Qwen3-1.7B head 7:1 layer (GQA: a KV group's k and v slots read by two GDN heads; q/k norms) and slot_conv's
    inputs: the head slots and the GDN heads' a and b of one projection-like tensor [batch, tokens, W] (strided views),
    q/k norm weights, conv taps, A_log and dt_bias."""
    from hhbench.layers.hydrahead import HydraAttention

    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots, n_la = len(layer.fused_rows) // 128, layer.gdn.n_heads
    torch.manual_seed(0)
    projection = torch.randn(batch, tokens, n_slots * 128 + 64, device="cuda").to(dtype)  # the same values in each
    slots = projection[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
    a, b = (projection[..., n_slots * 128 + i * n_la : n_slots * 128 + (i + 1) * n_la] for i in (0, 1))
    weight = (1 + 0.3 * torch.randn(2, 128, device="cuda")).to(dtype)
    taps = (0.5 * torch.randn(3 * n_la * 128, 4, device="cuda")).to(dtype)
    A_log, dt_bias = torch.rand(n_la, device="cuda") * 2, torch.randn(n_la, device="cuda")
    return layer, projection, (slots, layer.gdn_slots, weight, 1e-6, taps, a, b, A_log, dt_bias)


@pytest.mark.parametrize("tokens", [4099, 2])
def test_slot_conv_kernel_matches_its_torch_twin_and_replays_in_a_graph(tokens):
    """hhbench's slot_conv kernel (slot_prep.py) against glue.TORCH's twin on the GDN heads of a Qwen3-1.7B head 7:1
    layer, from strided slots and gate columns of a projection, with the conv state (2 tokens: fewer than the conv's
    taps): fp32 to rounding, bf16 within bf16's rounding of the fp32 twin, fp64 in fp64; then captured in a CUDA graph
    and replayed on new inputs (sweep --graph captures prefill steps)."""
    from hhbench.layers import glue, slot_prep

    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _, _, inputs = _slot_conv_inputs(tokens, 2, dtype)
        for name, op in (("kernel", slot_prep.slot_conv), ("twin", glue.slot_conv)):
            heads, state = op(*inputs, True)
            results[name, dtype] = (*heads, state)
    _kernel_within_twin(results, fp32=1e-5)
    _, projection, inputs = _slot_conv_inputs(tokens, 2, torch.float32)
    slot_prep.slot_conv(*inputs, True)  # compiled and its table on the GPU before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        heads, state = slot_prep.slot_conv(*inputs, True)
    projection.normal_()
    graph.replay()
    want_heads, want_state = glue.slot_conv(*inputs, True)
    for got, want in zip((*heads, state), (*want_heads, want_state), strict=True):
        assert rel(got, want) < 1e-5


def test_slot_conv_kernel_offsets_beyond_int32():
    """slot_conv's offsets past 2^31 elements: a 600K-token bf16 prefill of the Qwen3-1.7B head 7:1 layer's GDN heads
    reads slots 2.5e9 elements into the projection and writes k and v 1.1e9 and 2.2e9 elements into its buffer; its
    first and last tokens and the conv state against the twin's of the same tokens (the last from 8 tokens before
    them: the conv reads 3 back)."""
    from hhbench.layers import glue, slot_prep

    tokens = 600_000
    layer, projection, inputs = _slot_conv_inputs(tokens, 1, torch.bfloat16)
    assert projection.numel() > 2**31 and 3 * tokens * layer.gdn.n_heads * 128 > 2**31
    (slots, sources, weight, eps, taps, a, b, A_log, dt_bias) = inputs
    heads, state = slot_prep.slot_conv(*inputs, True)

    def twin(ends, output_final_state=False):
        return glue.slot_conv(slots[:, ends], sources, weight, eps, taps, a[:, ends], b[:, ends], A_log, dt_bias,
                              output_final_state)  # fmt: skip

    (first, _), (last, last_state) = twin(slice(0, 3)), twin(slice(tokens - 8, tokens), True)
    for got, head_first, head_last in zip(heads, first, last, strict=True):
        assert rel(got[:, :3], head_first) < 1e-2 and rel(got[:, tokens - 3 :], head_last[:, -3:]) < 1e-2
    assert rel(state, last_state) < 1e-2


@pytest.mark.parametrize("tokens", [4099, 1])
def test_head_norms_kernel_matches_its_torch_twin_and_replays_in_a_graph(tokens):
    """hhbench's head_norms kernel (slot_prep.py) against glue.TORCH's twin on a Qwen3-1.7B head 7:1 layer's outputs
    (14 GDN heads gated by a strided view of the projection, 2 FA heads as SDPA leaves them: [B, H, T, d]
    transposed; all 16 written in o_proj's column order): fp32 to rounding, bf16 within bf16's rounding of the fp32
    twin, fp64 in fp64; then captured in a CUDA graph and replayed on new inputs (decode steps run as graphs)."""
    from hhbench.layers import glue, slot_prep

    torch.manual_seed(0)
    o_la = torch.randn(2, tokens, 14, 128, device="cuda")
    gate = (2 * torch.randn(2, tokens, 14 * 128 + 64, device="cuda"))[..., : 14 * 128].unflatten(-1, (14, 128))
    o_fa = (3 * torch.randn(2, 2, tokens, 128, device="cuda")).transpose(1, 2)
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        inputs = [t.to(dtype) for t in (o_la, gate, o_fa)]
        results["kernel", dtype] = (slot_prep.head_norms(*inputs, 1e-6),)
        results["twin", dtype] = (glue.head_norms(*inputs, 1e-6),)
    assert results["kernel", torch.bfloat16][0].dtype == torch.bfloat16
    _kernel_within_twin(results, fp32=1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = slot_prep.head_norms(o_la, gate, o_fa, 1e-6)
    for t in (o_la, gate, o_fa):
        t.normal_()
    graph.replay()
    assert rel(captured, glue.head_norms(o_la, gate, o_fa, 1e-6)) < 1e-5


@pytest.mark.parametrize("tokens, per_sequence, eps", [(4099, False, 1e-6), (1, False, 1e-6), (300, True, 0.0)])
def test_slot_norm_rope_backward_kernel_matches_the_twins_autograd(tokens, per_sequence, eps):
    """hhbench's slot_norm_rope backward kernel (slot_prep.py) against glue.TORCH's (autograd through the twin, fp32)
    on the plans of a Qwen3-1.7B head 7:1 layer (GQA: a group's k slot read by two destinations; q/k norms), from
    strided slots of a projection into its gradient buffer: the slots' gradient and the norm weight's, fp32 to
    rounding, bf16 within bf16's rounding of the fp32 twin; the same bits on a second run (no atomics); an eps of 0
    over a partial block of tokens (its rows past the last token made the weight's gradient NaN); then captured in a
    CUDA graph and replayed on new gradients."""
    from hhbench.layers import glue, slot_prep
    from hhbench.layers.hydrahead import HydraAttention, rope_table

    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots = len(layer.fused_rows) // 128
    torch.manual_seed(0)
    projection = torch.randn(2, tokens, n_slots * 128 + 64, device="cuda")
    weight = 1 + 0.3 * torch.randn(2, 128, device="cuda")
    cos, sin = (t[:tokens] for t in rope_table(tokens, 128, 1e6, "cuda", torch.float32))
    if per_sequence:  # positions of each sequence of their own, as Hugging Face's tables for packed batches
        cos, sin = (torch.stack([t, t.roll(7, 0)]) for t in (cos, sin))
    slot_view = lambda t: t[..., : n_slots * 128].unflatten(-1, (n_slots, 128))  # noqa: E731
    for plan in layer.slot_plans.values():
        grads = [torch.randn(2, tokens, n, 128, device="cuda") for n in plan.sizes]
        want = torch.zeros_like(projection)
        want_weight = glue.slot_norm_rope_backward(grads, slot_view(projection), plan, weight, eps, cos, sin,
                                                   slot_view(want))  # fmt: skip
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            runs = []
            for _ in range(2):
                grad = torch.zeros_like(projection, dtype=dtype)
                grad_weight = slot_prep.slot_norm_rope_backward(
                    [g.to(dtype) for g in grads], slot_view(projection.to(dtype)), plan, weight.to(dtype), 1e-6,
                    cos.to(dtype), sin.to(dtype), slot_view(grad),
                )  # fmt: skip
                runs.append((grad, grad_weight))
            (grad, grad_weight), (again, again_weight) = runs
            assert torch.equal(grad, again) and torch.equal(grad_weight, again_weight)
            assert grad.dtype == grad_weight.dtype == dtype
            assert rel(grad, want) < tol and rel(grad_weight, want_weight) < tol, (dtype, plan.sizes)
    # captured in a CUDA graph (training steps are) and replayed on new gradients: no copy to the GPU per call
    grad, slots = torch.zeros_like(projection), slot_view(projection)
    slot_prep.slot_norm_rope_backward(grads, slots, plan, weight, eps, cos, sin, slot_view(grad))  # compiled first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grad_weight = slot_prep.slot_norm_rope_backward(grads, slots, plan, weight, eps, cos, sin, slot_view(grad))
    for g in grads:
        g.normal_()
    graph.replay()
    want = torch.zeros_like(projection)
    want_weight = glue.slot_norm_rope_backward(grads, slots, plan, weight, eps, cos, sin, slot_view(want))
    assert rel(grad, want) < 1e-5 and rel(grad_weight, want_weight) < 1e-5


BF16_LAYER = 5e-2  # one bf16 layer against its fp32 reference


def _layer_pair(options: dict):
    """(fast, reference): one random HydraHead layer (GQA, head_dim 128) as bf16 on the GPU path (fla, fused glue)
    and, with the same bf16-rounded weights, in fp32 on math SDPA, the torch chunked GDN and the reference glue."""
    from hhbench.layers.hydrahead import HydraAttention

    torch.manual_seed(0)
    reference = HydraAttention(256, 8, 4, 128, fa_backend="sdpa-math", gdn_backend="torch-chunk", glue="reference",
                               **options)  # fmt: skip
    with torch.no_grad():  # norm weights, gammas and biases away from their constant initial values
        for p in reference.parameters():
            if p.min() == p.max():
                p.add_(torch.randn_like(p) * 0.3)
    reference = reference.to(torch.bfloat16).float().cuda()
    fast = copy.deepcopy(reference).to(torch.bfloat16)
    fast.fa_backend, fast.gdn_backend, fast.glue = "auto", "auto", "auto"
    return fast, reference


LAYERS = [
    {"fa_heads": (0, 1, 2)},  # uneven: KV group 0 serves two FA heads, group 1 one FA head and one GDN head
    {"fa_heads": (1, 6), "qk_norm": True, "qkv_bias": True, "o_bias": True, "gdn_gate_bias": True},  # Qwen2/3
    {"fa_heads": (0,)},  # 7:1
    {"fa_heads": ()},  # a full GDN layer
    {"fa_heads": tuple(range(8))},  # a layer-wise hybrid's FA layer: no GDN heads, the fused glue all the same
    {"fa_heads": tuple(range(8)), "qk_norm": True, "qkv_bias": True, "o_bias": True},  # the same, Qwen2/3's
]


def _layer_id(options: dict) -> str:
    return f"{options['fa_heads']}{'-qwen' if options.get('qk_norm') else ''}"


@pytest.mark.parametrize("options", LAYERS, ids=_layer_id)
def test_fused_layer_prefill_and_train_match_the_fp32_reference(options):
    """300 tokens, 2 sequences: outputs, the input's gradient and every parameter's gradient."""
    from hhbench.layers import glue

    fast, reference = _layer_pair(options)
    device = torch.device("cuda")
    core = fast._core("train", device, torch.bfloat16)
    assert fast._glue_ops(core, device) is glue.fla_ops()  # the fused path runs
    x = torch.randn(2, 300, 256, device="cuda").to(torch.bfloat16)
    grad_out = torch.randn(2, 300, 256, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        assert rel(fast(x), reference(x.float())) < BF16_LAYER
    grads = []
    for layer, dtype in ((fast, torch.bfloat16), (reference, torch.float32)):
        xi = x.to(dtype).detach().requires_grad_()
        try:
            layer(xi).backward(grad_out.to(dtype))
        except RuntimeError as exc:  # fla refuses its GDN backward on Hopper with Triton 3.4-3.7.0 (no tilelang)
            if "incorrect" in str(exc):
                pytest.skip(str(exc).splitlines()[0])
            raise
        grads.append({"x": xi.grad, **{name: p.grad for name, p in layer.named_parameters()}})
    errors = {name: rel(grads[0][name], expected) for name, expected in grads[1].items()}
    assert all(error < BF16_LAYER for error in errors.values()), errors


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("options", LAYERS, ids=_layer_id)
@torch.no_grad()
def test_fused_layer_decode_follows_the_full_forward(options, batch):
    """Prefill 200 tokens into the cache (fla's conv with its final states, fla chunk with its final state), then 8
    steps one token at a time (fla's conv update, fused recurrent step): each step matches the fp32 reference's
    full forward. One sequence's step takes its output gate from the one projection GEMM (a contiguous view)."""
    fast, reference = _layer_pair(options)
    x = torch.randn(batch, 208, 256, device="cuda").to(torch.bfloat16)
    full = reference(x.float())
    cache = fast.new_cache(batch, 208, "cuda", torch.bfloat16)
    first = fast(x[:, :200], cache=cache)
    steps = torch.cat([fast(x[:, t : t + 1], cache=cache) for t in range(200, 208)], dim=1)
    assert cache.length == 208
    assert rel(first, full[:, :200]) < BF16_LAYER
    assert rel(steps, full[:, 200:]) < BF16_LAYER


@pytest.mark.parametrize("prompt", [1, 2])
@pytest.mark.parametrize("options", [LAYERS[0], LAYERS[3]], ids=_layer_id)
@torch.no_grad()
def test_fused_layer_decodes_after_a_prompt_shorter_than_the_conv(options, prompt):
    """A prompt of fewer tokens than the conv's 3 taps of history (generation from a BOS token): fla's conv gives the
    final state of a zero-padded history, and the steps after it follow the fp32 reference's full forward."""
    fast, reference = _layer_pair(options)
    x = torch.randn(2, prompt + 6, 256, device="cuda").to(torch.bfloat16)
    full = reference(x.float())
    cache = fast.new_cache(2, prompt + 6, "cuda", torch.bfloat16)
    outs = [fast(x[:, :prompt], cache=cache), *(fast(x[:, t : t + 1], cache=cache) for t in range(prompt, prompt + 6))]
    assert rel(torch.cat(outs, dim=1), full) < BF16_LAYER


@pytest.mark.parametrize("options", [LAYERS[1], LAYERS[4]], ids=_layer_id)
def test_fused_layer_trains_after_inference_mode_and_runs_when_made_there(options):
    """Evaluation under inference_mode, then a training step: the weights the fused path keeps and the index tensors
    made there are saved for its backward (inference tensors refused that); and a layer whose parameters were made in
    inference mode (inference tensors have no version counter, which the kept weights' key read)."""
    fast, reference = _layer_pair(options)
    x = torch.randn(1, 64, 256, device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        expected = reference(x.float())
        assert rel(fast(x), expected) < BF16_LAYER
    xi = x.detach().requires_grad_()
    try:
        fast(xi).float().pow(2).mean().backward()
    except RuntimeError as exc:  # fla refuses its GDN backward on Hopper with Triton 3.4-3.7.0 (no tilelang)
        if "incorrect" not in str(exc):
            raise
    else:
        assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0
    with torch.inference_mode():
        made_there, _ = _layer_pair(options)
        assert made_there.qkv.weight.is_inference()
        for _ in range(2):  # the fused weights made, then kept
            assert rel(made_there(x), expected) < BF16_LAYER


def test_distillation_on_the_gpu_trains_in_bf16_on_fla_kernels(tmp_path):
    """hhbench distill's loop on CUDA (bf16 teacher, fp32 masters, autocast, fla's chunk kernel): both stages'
    losses are finite and fall, and the checkpoint reloads into the model that trained."""
    from hhbench.distill import data
    from hhbench.distill.train import TRAIN, Job, read_train_rows, train
    from hhbench.models.loader import load_model
    from hhbench.models.variants import parse_variants
    from tests.test_distill import recipe

    loaded = load_model("tiny-random-llama", "cuda", "bf16")
    rec = recipe(stage1_tokens=20 * 8 * 512, stage2_tokens=20 * 8 * 512, seq=512, batch=8, dtype="bf16", warmup=0.0)
    stream = data.TokenStream(loaded.tokenizer, rec.seq, 0, 1.0, [], False)
    job = Job(rec, loaded, stream, tmp_path, torch.device("cuda"), log_every=1, echo=lambda *_: None)
    train(job, parse_variants(["head:3:1"]))
    rows = read_train_rows(tmp_path / TRAIN)
    for stage in (1, 2):
        losses = [r["loss"] for r in rows if r["stage"] == stage and r["kind"] == "step"]
        assert len(losses) == 20 and all(map(lambda v: v == v, losses))
        assert sum(losses[-3:]) < sum(losses[:3]), (stage, losses)


def test_crosscheck_says_how_many_points_it_checked(tmp_path):
    from inprocess import run_main

    args = ["sweep", "--models", "tiny", "--layouts", "head", "--ratios", "3:1", "--contexts", "64", "--device",
            "cuda", "--mode", "sequential,streams", "--target-ms", "2", "--min-reps", "2", "--out", str(tmp_path)]  # fmt: skip
    result = run_main(*args, "--crosscheck", "1")
    assert result.returncode == 0, result.stderr
    # a 64-token kernel step is far below the 2 ms a crosscheck needs: none ran, and the output says so
    assert "crosschecked 0 of the 1 points asked" in result.stderr
    assert {row["mode"] for row in map(json.loads, next(tmp_path.iterdir()).joinpath("rows.jsonl").open())} == {
        "sequential",
        "streams",
    }


@pytest.mark.parametrize("graph", [False, True])
def test_cuda_timing_warms_up_until_settled_and_samples_within_the_policy(graph):
    from hhbench.measure.timing import TimingPolicy, settled, time_callable

    a = torch.randn(2048, 2048, device="cuda")
    policy = TimingPolicy(warmup_ms=5, target_ms=20, min_reps=5, max_reps=60, graph=graph)
    timing = time_callable(lambda: a @ a, torch.device("cuda"), policy)
    assert 5 <= len(timing.samples_ms) <= 60 and timing.timer == ("cuda-graph" if graph else "cuda-events")
    assert "L2 flushed by a read before each sample" in timing.notes
    assert not any("had not settled" in note for note in timing.notes)
    assert timing.percentile(0.1) <= timing.median_ms <= timing.percentile(0.9)
    assert len(timing.samples_ms) < 10 or settled(timing.samples_ms)


@pytest.mark.parametrize("spread", [["--gpus", "all"], ["--launcher", "local", "--shards", "2"]])
def test_workers_each_measure_on_their_own_gpu(tmp_path, spread):
    """One worker per visible GPU (--gpus), or one GPU per submitit job: each row once, each worker's GPU in env."""
    from inprocess import run_main

    from hhbench.launch.local import visible_gpus
    from hhbench.rows.schema import read_rows
    from tests.conftest import ROOT

    if "--launcher" in spread:
        pytest.importorskip("submitit")
    args = ["sweep", "--models", "tiny", "--layouts", "head,layer", "--ratios", "3:1", "--contexts", "256,1k",
            "--passes", "prefill,decode", "--target-ms", "2", "--min-reps", "2", "--out", str(tmp_path), "--run", "w"]  # fmt: skip
    # the workers import hhbench from here and the kernels (fla) from where this process found them
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    result = run_main(*args, *spread, env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "w" / "rows.jsonl")
    failed = [(row.key, row.worker, row.status, row.reason) for row in rows if row.status != "ok"]  # the cause shown
    assert len(rows) == len({row.key for row in rows}) == 8 and not failed, failed
    workers = json.loads((tmp_path / "w" / "env.json").read_text())["workers"]
    assert {row.worker for row in rows} == set(workers)
    gpus = visible_gpus()
    given = {worker["cuda_visible_devices"] for worker in workers.values()}
    assert given <= set(gpus) and len(given) == min(len(gpus), len(workers)), workers
    assert all(worker["device"] == rows[0].device for worker in workers.values())


def test_a_second_worker_process_takes_the_first_ones_autotuning_from_the_shared_triton_cache(tmp_path):
    """Two worker-like processes one after the other, with the environment the launcher gives workers and one
    fresh Triton cache: the first autotunes fla's chunk kernels (TRITON_PRINT_AUTOTUNING prints each tuning) and
    leaves *.autotune.json there, the second tunes nothing."""
    import subprocess
    import sys

    from hhbench.launch.local import child_env
    from tests.conftest import ROOT

    code = (
        "import torch; from hhbench.kernels import registry; from tests.test_gdn_reference import gdn_inputs; "
        "x = [t.cuda().to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() "
        "for i, t in enumerate(gdn_inputs(1, 1000, 4, 128, 128, dtype=torch.float32))]; "
        "o, _ = registry.get('fla-chunk', registry.GDN).prefill(*x); o.float().sum().backward(); "
        "torch.cuda.synchronize()"
    )
    env = child_env({"TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_PRINT_AUTOTUNING": "1"})
    runs = [subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
            for _ in range(2)]  # fmt: skip
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-2000:]
    assert "Triton autotuning for function" in runs[0].stdout, runs[0].stdout[-2000:]
    assert list((tmp_path / "triton").rglob("*.autotune.json"))
    assert "Triton autotuning for function" not in runs[1].stdout, runs[1].stdout[-2000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@torch.no_grad()
def test_fused_layer_on_the_second_gpu_runs_there_under_the_first_as_current():
    """A layer on cuda:1 while cuda:0 is the current device (Hugging Face's device_map spreads layers so): its
    prefill and decode steps match the same layer's on cuda:0 (the same kernels: within bf16's rounding of
    reductions whose order may differ), and hhbench's Triton kernels (slot_norm_rope, split-KV decode: `auto`'s FA
    decode kernel) ran on cuda:1, on its stream (hybrid.launch_device). Without the switch they ran on cuda:0 with
    cuda:1's pointers, unordered with cuda:1's stream; over the H200s' NVLink that still gave the right numbers
    (results/gpu-tests-h200/call-12), so the profiler's device of each kernel is what tells."""
    from torch.profiler import ProfilerActivity, profile

    fast, _ = _layer_pair(LAYERS[1])
    x = torch.randn(2, 208, 256, device="cuda:0").to(torch.bfloat16)
    outputs = []
    for device in ("cuda:0", "cuda:1"):
        layer = copy.deepcopy(fast).to(device)
        cache = layer.new_cache(2, 208, device, torch.bfloat16)
        with torch.cuda.device(0), profile(activities=[ProfilerActivity.CUDA]) as profiler:
            first = layer(x[:, :200].to(device), cache=cache)
            steps = [layer(x[:, t : t + 1].to(device), cache=cache) for t in range(200, 208)]
            torch.cuda.synchronize(device)
        outputs.append(torch.cat([first, *steps], dim=1).cpu())
    ours = {(event.name, event.device_index) for event in profiler.events()
            if event.device_type == torch.autograd.DeviceType.CUDA
            and event.name in ("_slot_norm_rope", "_partial", "_merge")}  # fmt: skip
    assert {name for name, _ in ours} == {"_slot_norm_rope", "_partial", "_merge"}, ours
    assert {index for _, index in ours} == {1}, ours
    assert rel(outputs[1].float(), outputs[0].float()) < 1e-2
