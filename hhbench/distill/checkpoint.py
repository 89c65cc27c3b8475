"""A student on disk: results/<run>/checkpoints/<variant>/student.safetensors holds the parameters that differ
from the teacher (everything trained), with the recipe, the layer plan's FA heads, the stage and the tokens
trained as metadata; state.pt beside it holds what resuming needs (optimizer state, data position, RNG).
`load_student` rebuilds the converted model from the teacher and these parameters."""

import copy
import json
import random
from pathlib import Path

import torch

from hhbench.errors import UserError, require_extra
from hhbench.files import replacing
from hhbench.models.convert import convert
from hhbench.models.variants import parse_variant
from hhbench.spec.hybrid import HeadMap, HybridSpec, Layout
from hhbench.spec.layout import build_plan

CHECKPOINTS, WEIGHTS, STATE = "checkpoints", "student.safetensors", "state.pt"


def variant_dir(run_dir: str | Path, label: str) -> Path:
    """<run>/checkpoints/<label>: a variant's checkpoint folder, characters other than letters, digits, '-' and
    '.' in the label replaced by '_'."""
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in label)
    return Path(run_dir) / CHECKPOINTS / safe


def save(run_dir: Path, label: str, model, names: list[str], meta: dict, state: dict) -> Path:
    """Save the trained parameters `names` of `model` (fp32), metadata `meta` (JSON-able) and the resume `state` into
    the variant's folder, each file replaced whole (files.replacing: a run killed or failing mid-save keeps its
    previous file). An unwritable folder is the user's error, in one line; a writer's error is raised."""
    folder = variant_dir(run_dir, label)
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().float().cpu().contiguous() for name in names}
    metadata = {key: json.dumps(value) for key, value in meta.items()}
    with replacing(folder / WEIGHTS) as temporary:
        require_extra("safetensors.torch").save_file(tensors, str(temporary), metadata=metadata)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with replacing(folder / STATE) as temporary:
        torch.save({**state, "rng": rng}, temporary)
    return folder


def read_meta(run_dir: str | Path, label: str) -> dict | None:
    """The metadata of a variant's checkpoint; None where there is none."""
    path = variant_dir(run_dir, label) / WEIGHTS
    if not path.exists():
        return None
    with require_extra("safetensors").safe_open(str(path), "pt") as f:
        return {key: json.loads(value) for key, value in (f.metadata() or {}).items()}


def load_state(run_dir: Path, label: str) -> dict | None:
    """The resume state of a variant (optimizer, stage, step), RNG restored; None where there is none."""
    path = variant_dir(run_dir, label) / STATE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def load_weights(run_dir: Path, label: str, model) -> None:
    """Copy a checkpoint's parameters into `model` (a conversion of the teacher to the same plan)."""
    tensors = require_extra("safetensors.torch").load_file(str(variant_dir(run_dir, label) / WEIGHTS))
    params = dict(model.named_parameters())
    missing = [name for name in tensors if name not in params]
    if missing:
        raise UserError(f"checkpoint of {label} in {run_dir} does not fit this model (no parameter {missing[0]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def plan_of(label: str, fa_heads, shape):
    """The layer plan a checkpoint was trained with: its variant's layout and ratio, its recorded FA heads."""
    variant = parse_variant(label)
    head_map = HeadMap(fa_heads=tuple(tuple(layer) for layer in fa_heads), source="checkpoint")
    if variant.layout is Layout.HEAD:
        return build_plan(shape, HybridSpec(variant.layout, variant.ratio, head_map=head_map))
    return variant.plan(shape)


def student_meta(run_dir: str | Path, label: str, model: str) -> dict:
    """The metadata of the student `label` of run_dir, which must have been distilled from `model` (a ModelShape
    name). Raises UserError where run_dir holds no such student or where its teacher was another model."""
    meta = read_meta(run_dir, label)
    if meta is None:
        raise UserError(
            f"no student {label} in {run_dir} (run hhbench distill first; see {Path(run_dir) / CHECKPOINTS})"
        )
    if meta["model"] != model:
        raise UserError(
            f"student {label} in {run_dir} was distilled from {meta['model']}, not {model}: give its teacher as --model"
        )
    return meta


def load_student(run_dir: str | Path, label: str, teacher, fa_backend: str = "auto", gdn_backend: str = "auto"):
    """The distilled student `label` of run_dir on top of a conversion of teacher (a LoadedModel; its model is
    deep-copied, not changed). The model gets `hhbench_student`: checkpoint path, stage and tokens trained."""
    meta = student_meta(run_dir, label, teacher.shape.name)
    plan = plan_of(label, meta["fa_heads"], teacher.shape)
    model = convert(copy.deepcopy(teacher.model), plan, fa_backend=fa_backend, gdn_backend=gdn_backend)
    load_weights(Path(run_dir), label, model)
    model.hhbench_student = {"checkpoint": str(variant_dir(run_dir, label)), "stage": meta["stage"],
                             "tokens_trained": meta["tokens"], "status": meta.get("status", "ok")}  # fmt: skip
    return model
