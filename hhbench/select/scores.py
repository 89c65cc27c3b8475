"""From per-probe measurements to one score per head.

- retrieval (Wu et al. 2024): per probe, of the answer tokens the model copies (its argmax prediction is the
  next answer token) that occur in the needle, the fraction for which the head's argmax attention sits on a
  needle position holding that same token; averaged over the probes with at least one such token.
- patching: the normalized indirect effect of patching the head's output at the patch position from the
  counterfactual run, pooled over probes: sum(LD_base - LD_patched) / sum(LD_clean - LD_corrupt), over the
  probes where the needle moves the logit difference the right way (LD_clean > LD_corrupt). Pooling keeps a
  probe with a small denominator from blowing up the mean. 1 = the head alone carries the answer, 0 = none of
  it, negative = patching helps the right answer.
- combined: the mean of the two, each divided by its maximum over the model's heads (negative patching
  effects count as 0); a component that is 0 everywhere contributes 0. Max-normalization keeps how far the
  best heads stand out, which rank-normalization would flatten.
"""

from dataclasses import dataclass

import torch

from hhbench.select.trace import HeadTracer, ProbeResult

COMBINE = "mean of retrieval/max(retrieval) and max(patching,0)/max(patching) over all heads"

Grid = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class HeadScores:
    """Per-head scores [layers][heads]: retrieval, patching and combined (module docstring), with probe statistics."""

    retrieval: Grid
    patching: Grid
    combined: Grid
    stats: dict


def _grid(tensor: torch.Tensor) -> Grid:
    return tuple(tuple(round(float(v), 6) for v in row) for row in tensor.tolist())


def _by_max(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clamp(min=0)
    top = tensor.max()
    return tensor / top if top > 0 else torch.zeros_like(tensor)


def combine(retrieval: torch.Tensor, patching: torch.Tensor) -> torch.Tensor:
    """The combined score of [L, H] retrieval and patching: the mean of each divided by its maximum over the heads
    (negative values as 0)."""
    return (_by_max(retrieval) + _by_max(patching)) / 2


def aggregate(results: list[ProbeResult]) -> HeadScores:
    """HeadScores from the probes' results: retrieval (Wu et al. 2024) and pooled patching effects, combined
    (module docstring). Raises ValueError for no results."""
    if not results:
        raise ValueError("no probe results")
    shape = results[0].hits.shape
    copying = [r for r in results if r.copied]
    retrieval = sum((r.hits / r.copied for r in copying), torch.zeros(shape)) / max(1, len(copying))
    moving = [r for r in results if r.ld_clean > r.ld_corrupt]
    effect = sum((r.ld_base - r.ld_patched for r in moving), torch.zeros(shape))
    total = sum(r.ld_clean - r.ld_corrupt for r in moving)
    patching = effect / total if moving else torch.zeros(shape)
    stats = {
        "probes_run": len(results),
        "probes_exact": sum(r.exact for r in results),  # the model copies the whole answer
        "probes_retrieval": len(copying),
        "probes_patching": len(moving),
        "copied_needle_tokens": sum(r.copied for r in results),
        "ld_clean_mean": round(sum(r.ld_clean for r in results) / len(results), 4),
        "ld_corrupt_mean": round(sum(r.ld_corrupt for r in results) / len(results), 4),
        # the patch pass's unpatched row must reproduce the clean run: its largest deviation
        "patch_pass_max_error": round(max(abs(r.ld_base - r.ld_clean) for r in results), 6),
    }
    return HeadScores(_grid(retrieval), _grid(patching), _grid(combine(retrieval, patching)), stats)


def score_model(model, probes: list, on_probe=None) -> HeadScores:
    """Trace every probe through the model (see hhbench.select.trace) and aggregate; `on_probe(i, probe)` is
    called after each probe."""
    results = []
    with HeadTracer(model) as tracer:
        for i, probe in enumerate(probes):
            results.append(tracer.run(probe))
            if on_probe is not None:
                on_probe(i, probe)
    return aggregate(results)
