"""Analytic rows: one Row per configuration with its costs (the views compare them with layer-wise 3:1)."""

from hhbench.analytic.costs import analytic_costs
from hhbench.rows.schema import Row
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import HybridSpec
from hhbench.spec.layout import LayerPlan, distinct_plans
from hhbench.spec.shapes import ModelShape


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
    """The analytic Row of one configuration: key fields, plan_fields and analytic_costs (raises as it does).
    `requested_ratio` keeps the ratio as the user wrote it when the plan's spec spells it differently."""
    costs = analytic_costs(plan, pass_, context, batch, scope, dtype)
    return Row(
        ratio=requested_ratio or str(plan.spec.ratio),
        context=context,
        batch=batch,
        pass_=pass_.value,
        scope=scope.value,
        dtype=dtype,
        **plan_fields(plan, scope),
        **costs.as_dict(),
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
