"""Analytic rows: one Row per configuration, with its costs against the layer-wise 3:1 baseline."""

from functools import lru_cache

from hhbench.analytic.costs import Costs, analytic_costs
from hhbench.rows.schema import Row
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import LAYER31, HybridSpec
from hhbench.spec.layout import LayerPlan, build_plan, distinct_plans
from hhbench.spec.shapes import ModelShape


@lru_cache(maxsize=4096)
def _baseline(shape: ModelShape, gdn, pass_: Pass, context: int, batch: int, scope: Scope, dtype: str) -> Costs:
    plan = build_plan(shape, HybridSpec(LAYER31.layout, LAYER31.ratio, gdn))
    return analytic_costs(plan, pass_, context, batch, scope, dtype)


def _ratio(value: float, base: float) -> float | None:
    return value / base if base else None


def plan_fields(plan: LayerPlan, scope: Scope) -> dict:
    """Head counts as the scope sees them: the whole model, or the average layer."""
    per = plan.shape.n_layers if scope is not Scope.MODEL else 1
    return {
        "model": plan.shape.name,
        "layout": plan.spec.layout.value,
        "variant": plan.spec.label,
        "ratio_effective": plan.ratio_effective,
        "fa_heads": plan.fa_heads / per,
        "la_heads": plan.la_heads / per,
        "kv_groups": plan.kv_groups / per,
        "head_map": plan.spec.head_map.source if plan.spec.head_map else "",
        "kv_aware": plan.spec.kv_aware,
    }


def cost_row(
    plan: LayerPlan,
    pass_: Pass,
    context: int,
    batch: int = 1,
    scope: Scope = Scope.MODEL,
    dtype: str = "bf16",
    requested_ratio: str | None = None,
) -> Row:
    costs = analytic_costs(plan, pass_, context, batch, scope, dtype)
    base = _baseline(plan.shape, plan.spec.gdn, pass_, context, batch, scope, dtype)
    return Row(
        ratio=requested_ratio or str(plan.spec.ratio),
        context=context,
        batch=batch,
        pass_=pass_.value,
        scope=scope.value,
        dtype=dtype,
        **plan_fields(plan, scope),
        **costs.as_dict(),
        vs_layer31_flops=_ratio(costs.flops_total, base.flops_total),
        vs_layer31_kv=_ratio(costs.kv_cache_bytes, base.kv_cache_bytes),
    )


def analytic_rows(
    shape: ModelShape,
    specs: list[tuple[str, HybridSpec]],
    contexts: list[int],
    passes: list[Pass],
    batch: int = 1,
    scope: Scope = Scope.MODEL,
    dtype: str = "bf16",
) -> list[Row]:
    """Rows for every (spec, pass, context); specs that normalize to the same plan appear once.
    `specs` pairs each spec with the ratio text the user asked for."""
    rows = []
    for requested, plan in distinct_plans(shape, specs):
        for pass_ in passes:
            for context in contexts:
                rows.append(cost_row(plan, pass_, context, batch, scope, dtype, requested))
    return rows
