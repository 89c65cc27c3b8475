"""The Triton split-KV decode kernels against attention over the whole cache. Without a GPU, Triton's interpreter
runs them on CPU tensors (conftest sets TRITON_INTERPRET=1 there); the bf16 path and the timing are GPU work
(tests/test_gpu.py, results/decode-triton-h100)."""

from contextlib import nullcontext

import numpy
import pytest
import torch

from hhbench.kernels.fa import expand_kv
from tests.test_backends import softmax_attention
from tests.test_gdn_reference import rel

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # on the GPU tl.dot takes fp32 inputs as tf32 (hhbench's fp32 bound)
_version = lambda text: tuple(int(part) for part in text.split(".")[:2])  # noqa: E731
if DEVICE == "cpu" and _version(triton.__version__) < (3, 8) and _version(numpy.__version__) >= (2, 4):
    pytest.skip("Triton's interpreter before 3.8 fails on numpy >= 2.4 (scalar arguments)", allow_module_level=True)

from hhbench.kernels.triton_decode import plan_segments, split_kv_decode  # noqa: E402


@pytest.mark.parametrize(
    ("batch", "length", "q_heads", "kv_heads", "target_blocks"),
    [
        (1, 1000, 4, 4, 16),  # 3 segments of 384 tokens (min_segment caps the 4 wanted), the last 232
        (2, 777, 8, 2, 8),  # GQA groups of 4, 2 segments of 448 and 329 tokens
        (1, 300, 6, 3, 64),  # groups of 2 (query rows padded to 16); 1 segment: min_segment caps the split
        (3, 64, 2, 1, 1),  # one block of one segment
    ],
)
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []),  # no bf16 in numpy
)
def test_triton_split_kv_decode_equals_attention_over_the_whole_cache(
    batch, length, q_heads, kv_heads, target_blocks, dtype
):
    q = torch.randn(batch, 1, q_heads, 64)
    k, v = torch.randn(batch, length, kv_heads, 64), torch.randn(batch, length, kv_heads, 64)
    expected = softmax_attention(q, expand_kv(k, q_heads), expand_kv(v, q_heads), causal=False)
    out = split_kv_decode(*(x.to(DEVICE, dtype) for x in (q, k, v)), target_blocks, min_segment=256)
    assert out.dtype == dtype and out.shape == q.shape
    assert (
        rel(out.float().cpu(), expected) < {torch.float32: FP32_TOL, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    )


def test_triton_split_kv_decode_reads_strided_queries_and_caches():
    """The layer hands over views of its projections: strided query heads, caches sliced out of larger ones."""
    q = torch.randn(1, 1, 8, 64)[:, :, ::2]
    k, v = (torch.randn(1, 600, 4, 64)[:, 50:550, 1:3] for _ in range(2))
    expected = softmax_attention(q, expand_kv(k, 4), expand_kv(v, 4), causal=False)
    assert rel(split_kv_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 4, 128).cpu(), expected) < FP32_TOL


def test_segments_fill_the_target_without_an_empty_one():
    assert plan_segments(32768, pairs=4, target_blocks=264, block_n=64, min_segment=256) == (64, 512)
    assert plan_segments(131072, pairs=32, target_blocks=264, block_n=64, min_segment=256) == (9, 14592)
    assert plan_segments(131072, pairs=1, target_blocks=264, block_n=64, min_segment=256) == (128, 1024)
    assert plan_segments(1000, pairs=4, target_blocks=16, block_n=64, min_segment=256) == (3, 384)
    assert plan_segments(100, pairs=1, target_blocks=264, block_n=64, min_segment=256) == (1, 128)
    for length in range(1, 3000, 37):
        segments, segment_len = plan_segments(length, 3, 264, 64, 256)
        assert segment_len % 64 == 0 and (segments - 1) * segment_len < length <= segments * segment_len


def test_kernels_launch_on_their_tensors_gpu(monkeypatch):
    """launch_device makes a tensor's GPU current where another one is (Triton launches on the current device), and
    does nothing for a tensor on the current GPU or on the CPU (tests/test_gpu.py runs a layer on cuda:1 for real)."""
    from types import SimpleNamespace

    from hhbench.kernels.hybrid import launch_device

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or nullcontext())
    with launch_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    for current in (torch.device("cuda", 0), torch.device("cpu")):
        with launch_device(SimpleNamespace(device=current)):
            pass
    assert entered == [torch.device("cuda", 1)]
