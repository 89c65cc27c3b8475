"""The GPU paths of converted models and head selection: cuDNN/flash SDPA and fla's kernels against the torch
references. CI has no GPU, so these skip there; they run on the device machine (README, "GPU paths")."""

import copy
import importlib.util

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
    assert registry.resolve("auto", registry.GDN, "cuda", "prefill").name == "fla-chunk"
    assert registry.resolve("auto", registry.GDN, "cuda", "decode").name == "fla-recurrent"
    assert registry.resolve("auto", registry.FA, "cuda", "prefill").name == "sdpa-cudnn"


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


@torch.no_grad()
def test_init_from_teacher_statistics_on_gpu_kernels_matches_the_reference(llama):
    """The default init (decays from the teacher's attention distance, least-squares gammas) fitted through
    cuDNN + fla gives the gammas the torch references give."""
    model, shape, ids = llama
    plan = parse_variant("head:3:1").plan(shape)
    tau = teacher_head_tau(model, ids, GDNInit())
    fast = convert(copy.deepcopy(model), plan, head_tau=tau, calibration_ids=ids)
    ref = convert(copy.deepcopy(model), plan, None, GDNInit(), "sdpa-math", "torch-chunk", tau, ids)
    for a, b in zip(decoder_layers(fast), decoder_layers(ref), strict=True):
        assert torch.allclose(a.self_attn.attn.head_gamma, b.self_attn.attn.head_gamma, rtol=1e-2, atol=1e-4)


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
