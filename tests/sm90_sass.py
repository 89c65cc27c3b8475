"""Compiles hhbench's glue kernels (hhbench/layers/slot_prep.py) for sm_90 without a GPU and prints, as one JSON
object per kernel name, what ptxas made of them: registers a thread, local memory (spills), the global memory
accesses by width (SASS opcodes, e.g. LDG.E.128: a 16-byte load a thread) and the barriers. Run as a script
(tests/test_slot_prep.py does, in a fresh interpreter: Triton's interpreter, which the tests turn on, cannot compile).
The kernels' arguments are typed as a bf16 Qwen3 layer's and marked divisible by 16 where Triton's launch specializes
them so on the GPU (pointers, strides, the token counts): how it compiles them for that layer."""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hhbench.layers import slot_prep

# Pointer arguments that are not bf16 slots: index tables and fp32 tables and gates
INT_POINTERS = {"Plan", "Sources", "Inverse"}
FP32_POINTERS = {"Cos", "Sin", "A_log", "Dt_bias", "G", "Beta", "DW"}
DIVISIBLE_INTS = {"T", "n_tokens"}  # with every stride_*: multiples of 16 in a Qwen3 layer's launch
SASS_TOOL = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(kernel) -> tuple[dict, set]:
    """(signature, the indices of the arguments divisible by 16) of a bf16 layer's launch."""
    signature, divisible = {}, set()
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name[0].isupper() and name not in DIVISIBLE_INTS:
            signature[name] = "*i32" if name in INT_POINTERS else "*fp32" if name in FP32_POINTERS else "*bf16"
            divisible.add(index)
        elif "eps" in name:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in DIVISIBLE_INTS:
                divisible.add(index)
    return signature, divisible


def compiled(kernel, constexprs: dict, num_warps: int) -> dict:
    """{"registers", "local_bytes", "accesses": {SASS opcode: count}, "barriers": BAR.SYNCs (a layout conversion through
    shared memory takes one or two)} of `kernel` compiled for sm_90."""
    signature, divisible = _signature(kernel)
    source = ASTSource(kernel, signature, constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    binary = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(binary.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([SASS_TOOL, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([SASS_TOOL, "-sass", cubin.name], capture_output=True, text=True, check=True)
    resources = dict(re.findall(r"(REG|LOCAL):(\d+)", usage.stdout))
    accesses = collections.Counter(re.findall(r"\b((?:LDG|STG)\.[A-Z0-9.]+)", sass.stdout))
    barriers = len(re.findall(r"\bBAR\.SYNC", sass.stdout))
    return {"registers": int(resources["REG"]), "local_bytes": int(resources["LOCAL"]), "accesses": dict(accesses),
            "barriers": barriers}  # fmt: skip


def glue_kernels() -> dict:
    """The four kernels at a Qwen3 layer's sizes (d = 128, conv of 4 taps, q/k norms and gate on; a slot read by two
    destinations in slot_norm_rope's backward: GQA's shared k) with the block sizes and warps slot_prep launches them
    with."""
    slots = {"D": 128, "BLOCK_D": 128, "COMPUTE": tl.float32}
    runs = {"ROWS": slot_prep.CONV_ROWS, "RUN": slot_prep.CONV_RUN, "K": 4, "NORM": True, "STATE": False}
    halves = {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_T": slot_prep.BLOCK_TOKENS, "COMPUTE": tl.float32}
    return {
        "slot_conv": compiled(slot_prep._slot_conv, {**slots, **runs}, slot_prep.CONV_WARPS),
        "head_norms": compiled(slot_prep._head_norms, {**slots, "BLOCK_T": slot_prep.SLOT_BLOCK_TOKENS, "GATED": True},
                               slot_prep.SLOT_WARPS),
        "slot_norm_rope": compiled(slot_prep._slot_norm_rope, {**halves, "NORM": True}, 4),
        "slot_norm_rope_backward": compiled(slot_prep._slot_norm_rope_backward, {**halves, "NORM": True, "FAN_OUT": 2},
                                            4),
    }  # fmt: skip


if __name__ == "__main__":
    json.dump(glue_kernels(), sys.stdout)
