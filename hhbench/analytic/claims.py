"""Checks the seed article's claim: a HydraHead block 'should reduce attention-related FLOPs by up to roughly
40% (around one-third)'. Attention-related FLOPs are the attention cores plus all attention projections (Q, K,
V, O, GDN gates and short conv), summed over the model's layers."""

from dataclasses import dataclass

from hhbench.analytic.costs import analytic_costs
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import LAYER31, HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan
from hhbench.spec.shapes import ModelShape
from hhbench.spec.units import format_count

THRESHOLDS = ((1 / 3, "one third"), (0.40, "40%"))
CANDIDATES = (HybridSpec(Layout.HEAD, Ratio(3, 1)), HybridSpec(Layout.HEAD, Ratio(7, 1)))
REFERENCES = ((HybridSpec(Layout.FA, Ratio(0, 1)), "a vanilla block"), (LAYER31, "layer-wise 3:1"))


@dataclass(frozen=True)
class ClaimPoint:
    """One comparison for the seed article's claim: a head-level candidate's and a reference's attention-related
    FLOPs at one context (tokens)."""

    candidate: str
    reference: str
    context: int
    candidate_flops: float
    reference_flops: float

    @property
    def cut(self) -> float:
        """Fraction of the reference's attention-related FLOPs that the candidate saves (negative: it costs more)."""
        return 1 - self.candidate_flops / self.reference_flops


def attention_related(shape: ModelShape, spec: HybridSpec, pass_: Pass, context: int, batch: int) -> float:
    """Attention-related FLOPs of `spec` on `shape` for the whole model (Scope.MODEL): the FA and GDN cores
    plus all attention projections (Q, K, V, O, GDN gates, short conv), for `batch` sequences of `context` tokens."""
    costs = analytic_costs(build_plan(shape, spec), pass_, context, batch, Scope.MODEL)
    return costs.flops_attention + costs.flops_proj


def claim_points(
    shape: ModelShape, contexts: list[int], pass_: Pass = Pass.PREFILL, batch: int = 1
) -> list[ClaimPoint]:
    """ClaimPoints of every candidate (head-level 3:1 and 7:1) against every reference (vanilla, layer-wise 3:1)
    at each of `contexts` (tokens), from analytic_costs."""
    return [
        ClaimPoint(
            candidate.label,
            reference.label,
            context,
            attention_related(shape, candidate, pass_, context, batch),
            attention_related(shape, reference, pass_, context, batch),
        )
        for candidate in CANDIDATES
        for reference, _ in REFERENCES
        for context in contexts
    ]


def _where(points: list[ClaimPoint], threshold: float) -> str:
    holds = [p.cut >= threshold for p in points]
    if all(holds):
        return f"at every context checked ({format_count(points[0].context)} to {format_count(points[-1].context)})"
    if not any(holds):
        return "at no context checked"
    first = holds.index(True)
    if all(holds[first:]):
        return f"from {format_count(points[first].context)} on"
    return "only at " + ", ".join(format_count(p.context) for p, ok in zip(points, holds, strict=True) if ok)


def claim_sentences(shape: ModelShape, points: list[ClaimPoint], pass_: Pass) -> list[str]:
    """One sentence per (candidate, reference): at which contexts the candidate cuts attention-related FLOPs by
    at least one third and by 40% (the seed article's claim), and the cut at each context."""
    sentences = []
    names = dict((ref.label, name) for ref, name in REFERENCES)
    for candidate in CANDIDATES:
        for reference, _ in REFERENCES:
            group = sorted(
                (p for p in points if p.candidate == candidate.label and p.reference == reference.label),
                key=lambda p: p.context,
            )
            cuts = ", ".join(f"{format_count(p.context)}: {p.cut:+.1%}" for p in group)
            verdicts = "; ".join(f"by >= {label} {_where(group, value)}" for value, label in THRESHOLDS)
            sentences.append(
                f"{shape.name}, {pass_.value}: head-level {candidate.ratio} against {names[reference.label]} cuts "
                f"attention-related FLOPs {verdicts}. Cut per context: {cuts}."
            )
    return sentences
