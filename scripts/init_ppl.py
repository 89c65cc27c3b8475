"""Perplexity of converted, untrained models against the teacher's on held-out text: how close each GDN
initialization starts to the teacher (issue 11, item 1).

    PYTHONPATH=. python scripts/init_ppl.py --text doc-text/held-out.txt --out results/init-smollm2-135m \\
        [--model smollm2-135m] [--variants head:7:1,head:3:1,layer:3:1] [--inits spread-rms,...] \\
        [--metric ppl|layer_error] [--seqs 8] [--length 1024]

The text (`scripts/doc-text.sh`'s held-out.txt) is tokenized once and cut into the first --seqs windows of
--length tokens. Every variant is converted from the teacher the way `hhbench eval` converts it (gammas and
decays from the teacher's statistics on the same 512 calibration tokens of essay filler), once per
initialization in INITS (--inits picks some, in that order), and scored: `ppl`, next-token cross-entropy over
every window (fp32); `layer_error`, each converted layer's attention-output error against the teacher's on
the first window, each layer fed the teacher's input. Rows go to OUT/ppl.jsonl as they finish (a rerun skips
the finished ones); OUT/env.json records the machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hhbench.eval.harness import calibration_ids
from hhbench.measure.env import capture_env
from hhbench.models.convert import (
    GDNInit,
    HydraAdapter,
    convert,
    decoder_layers,
    head_outputs,
    teacher_attention_io,
    teacher_head_rms,
    teacher_head_tau,
)
from hhbench.models.loader import load_model
from hhbench.models.variants import parse_variant

# "spread-rms" is the initialization before issue 11 (decays log-spaced in head order, gamma the teacher head's
# RMS); "distance-nosink-ls" is GDNInit()'s default since.
BEFORE = GDNInit(decay="spread", gamma="rms")
INITS = {
    "spread-rms": BEFORE,
    "spread-rms-beta0.3": dataclasses.replace(BEFORE, beta=0.3),
    "spread-rms-beta0.5": dataclasses.replace(BEFORE, beta=0.5),
    "distance-nosink-rms": dataclasses.replace(BEFORE, decay="distance-nosink"),
    "spread-ls": dataclasses.replace(BEFORE, gamma="least-squares"),
    "distance-ls": dataclasses.replace(BEFORE, decay="distance", gamma="least-squares"),
    "distance-nosink-ls": GDNInit(),
    "distance-nosink-ls-beta0.3": dataclasses.replace(BEFORE, decay="distance-nosink", gamma="least-squares", beta=0.3),
    "distance-nosink-ls-v1": dataclasses.replace(BEFORE, decay="distance-nosink", gamma="least-squares", v_conv=1.0),
}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> dict:
    """Next-token cross-entropy (nats/token) and perplexity over windows [n, T] (every window's first token is
    context only)."""
    total, count = 0.0, 0
    for row in windows:
        logits = model(row[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}


@torch.no_grad()
def layer_error(model, io: list[tuple]) -> dict:
    """Each converted layer fed the teacher's input: the squared error of its attention output against the
    teacher layer's, relative to the latter's square (1.0: no better than a silent layer), mean over layers;
    and the GDN heads' output RMS over their gamma (1.0 where the per-head norm's eps does not bite)."""
    errors, ratios = [], []
    for layer, (x, position_embeddings, target) in zip(decoder_layers(model), io, strict=True):
        if not isinstance(layer.self_attn, HydraAdapter):
            continue
        attn = layer.self_attn.attn
        heads = head_outputs(attn, x, position_embeddings)
        out = attn.o_proj(heads.flatten(2))
        reference = attn.o_proj(target.flatten(2))  # o_proj is the teacher's
        errors.append(((out - reference).pow(2).sum() / reference.pow(2).sum()).item())
        la = list(attn.split.la_heads)
        rms = heads[:, :, la].pow(2).mean(dim=(0, 1, 3)).sqrt()
        ratios += (rms / attn.head_gamma[la].abs().clamp_min(1e-30)).tolist()
    return {
        "layer_error": sum(errors) / len(errors),
        "layer_errors": [round(e, 4) for e in errors],
        "gdn_rms_over_gamma": sum(ratios) / len(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="head:7:1,head:3:1,layer:3:1")
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--metric", choices=("ppl", "layer_error"), default="ppl")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    args = ap.parse_args()
    inits = args.inits.split(",")
    unknown = [name for name in inits if name not in INITS]
    if unknown:
        raise SystemExit(f"unknown init {', '.join(unknown)}: choose from {', '.join(INITS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "ppl.jsonl"
    done = set()
    if rows_path.exists():
        done = {(r["variant"], r["init"], r["metric"]) for r in map(json.loads, rows_path.read_text().splitlines())}
    env_path = args.out / "env.json"
    if not env_path.exists():
        env = capture_env({"command": "python scripts/init_ppl.py", "args": {k: str(v) for k, v in vars(args).items()}})
        env_path.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")

    loaded = load_model(args.model, device="cpu", dtype="fp32")
    ids = loaded.tokenizer(args.text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < args.seqs * args.length:
        raise SystemExit(f"{args.text} holds {ids.numel()} tokens, fewer than {args.seqs} x {args.length}")
    windows = ids[: args.seqs * args.length].view(args.seqs, args.length)
    calibration = calibration_ids(loaded)
    head_rms = teacher_head_rms(loaded.model, calibration)
    taus = {}
    # the layer error is measured on the first window only: each layer fed the teacher's input, no full forward
    io = teacher_attention_io(loaded.model, windows[:1]) if args.metric == "layer_error" else None

    def record(variant: str, init: str, fn) -> None:
        if (variant, init, args.metric) in done:
            print(f"skip {variant} {init} {args.metric}")
            return
        start = time.perf_counter()
        row = {"model": args.model, "variant": variant, "init": init, "metric": args.metric, **fn()}
        row |= {"seqs": 1 if io else args.seqs, "length": args.length, "text": args.text.name}
        row |= {"gdn_init": dataclasses.asdict(INITS[init]) if init in INITS else None}
        row["seconds"] = round(time.perf_counter() - start, 1)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{variant:>12} {init:>20} {args.metric}: {row.get('ppl', row.get('layer_error')):.4f}", flush=True)

    if args.metric == "ppl":
        record("teacher", "-", lambda: perplexity(loaded.model, windows))
    for variant in args.variants.split(","):
        plan = parse_variant(variant).plan(loaded.shape)
        for name in inits:
            init = INITS[name]
            if init.decay not in taus:
                taus[init.decay] = teacher_head_tau(loaded.model, calibration, init)

            def score(plan=plan, init=init):
                model = copy.deepcopy(loaded.model)
                convert(model, plan, head_rms, init, head_tau=taus[init.decay], calibration_ids=calibration)
                return perplexity(model, windows) if io is None else layer_error(model, io)

            record(variant, name, score)


if __name__ == "__main__":
    main()
