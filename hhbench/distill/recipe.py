"""The recipe of a distillation run: every choice that shapes the students, frozen and written to recipe.json.
A run folder belongs to one recipe: resuming it with any other is refused (a mixed run compares nothing)."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError
from hhbench.files import open_output, read_json

RECIPE = "recipe.json"


@dataclass(frozen=True)
class Recipe:
    """Every choice that shapes a distillation run's students (module docstring): model, variants, data, sequence
    length and batch (tokens, sequences), tokens per stage, learning rates and schedule, seed, dtype, GDN init."""

    model: str
    variants: tuple[str, ...]
    head_map: str  # path of the head map for :selected variants ("" without)
    data: tuple[str, ...]  # text files or folders; () for the generated retrieval stream alone
    data_tokens: int  # tokens of the text corpus (0 without --data): a changed file changes the recipe
    retrieval_ratio: float  # the fraction of sequences that are generated retrieval documents
    chat: bool  # retrieval documents in the tokenizer's chat template
    seq: int  # tokens per sequence (model inputs; targets are shifted by one)
    batch: int  # sequences per optimizer step, over all data-parallel ranks
    stage1_tokens: int
    stage2_tokens: int
    lr_new: float  # new parameters: GDN gates, convs, output gate, per-head norms and gammas
    lr_attn: float  # converted layers' q/k/v/o projections, stage 2, with train_attn
    train_attn: bool
    schedule: str  # cosine | linear (decay after warmup, to min_lr_ratio of the peak)
    warmup: float  # fraction of each stage's steps
    min_lr_ratio: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float  # max global grad norm; 0: no clipping
    answer_weight: float  # stage 2: KL weight of positions that predict an answer token (others 1)
    answer_ce: float  # stage 2: weight of cross-entropy on answer tokens added to the KL (0: none)
    seed: int
    dtype: str  # the frozen weights' dtype; trained parameters are fp32 masters
    init: dict  # hhbench.models.convert.GDNInit, as fields

    def steps(self, stage: int) -> int:
        """Optimizer steps of `stage` (1 or 2): its tokens over batch * seq, rounded up; 0 for a stage of no tokens."""
        tokens = self.stage1_tokens if stage == 1 else self.stage2_tokens
        return math.ceil(tokens / (self.batch * self.seq)) if tokens else 0

    def first_sequence(self, stage: int) -> int:
        """Index of the stream's first sequence in `stage`: stage 2 reads on where stage 1 stopped."""
        return 0 if stage == 1 else self.steps(1) * self.batch

    def to_dict(self) -> dict:
        """The recipe as JSON-ready data (recipe.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A Recipe from recipe.json's data. Raises UserError when its fields are not this version's."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(data) != fields:
            raise UserError(f"{RECIPE} does not match this version's recipe fields")
        data = dict(data)
        for name in ("variants", "data", "betas"):
            data[name] = tuple(data[name])
        return cls(**data)


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    """recipe.json of a new run, or check that an existing run has this recipe."""
    path = run_dir / RECIPE
    if path.exists():
        found = load_recipe(run_dir)
        if found != recipe:
            changed = [k for k, v in recipe.to_dict().items() if found.to_dict().get(k) != v]
            raise UserError(
                f"run {run_dir} was made with another recipe (differs in {', '.join(changed)}): "
                "resume it with the same options, or start another --run"
            )
        return
    with open_output(path, "w") as out:
        json.dump(recipe.to_dict(), out, indent=2)
        out.write("\n")


def load_recipe(run_dir: str | Path) -> Recipe:
    """The recipe of the run folder `run_dir`. Raises UserError when it has no recipe.json or an unreadable one."""
    path = Path(run_dir) / RECIPE
    if not path.exists():
        raise UserError(f"no distillation run at {run_dir}: {RECIPE} is missing")
    return Recipe.from_dict(read_json(path, "recipe"))
