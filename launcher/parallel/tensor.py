"""dist.tensor_parallel: each layer's matrices split over the ranks of a tensor-parallel group
(`torch.distributed.tensor.parallel`), attention and MLP column-wise then row-wise, so each pair
needs one all-reduce in the forward and one in the backward, and every other module (embeddings,
norms, the head) is replicated. Applied before activation checkpointing and FSDP (torchtitan's
order); FSDP then shards the resulting DTensors over the data-parallel ranks.

The plan, by module-name pattern (`*` matches any part of a name), comes from the recipe
(`dist.tp_plan`), else the model: the built-in GPT's `tp_plan`, or a transformers config's
`base_model_tp_plan` (prefixed with the base model's attribute). Only `colwise` and `rowwise` are
applied: the maths stays exact whatever is left replicated."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from launcher.errors import RecipeError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

KEY = "dist.tensor_parallel"
STYLES = ("colwise", "rowwise")


def plan_of(model: nn.Module, recipe_plan: Mapping[str, str] | None) -> dict[str, str]:
    """Module-name pattern -> style: the recipe's, the model's own, or its transformers config's."""
    if recipe_plan:
        return dict(recipe_plan)
    own = getattr(model, "tp_plan", None)  # transformers models have one too, empty where there is no plan
    if isinstance(own, Mapping) and own:
        return dict(own)
    config_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if isinstance(config_plan, Mapping) and config_plan:
        prefix = getattr(model, "base_model_prefix", "")
        base = prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""
        return {(f"{base}.{k}" if base else k): v for k, v in config_plan.items()}
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        # GPT-2's attention and MLP: no plan can help, and "give one" would send the user on an errand
        raise RecipeError(
            KEY,
            f"{type(model).__name__} has no tensor-parallel plan, and its layers are transformers' Conv1D, which "
            "tensor parallelism cannot split (only Linear layers); pick a model with Linear layers (Llama, Qwen, "
            "Mistral, the built-in GPT) or set dist.tensor_parallel=1",
        )
    raise RecipeError(
        KEY,
        f"{type(model).__name__} has no tensor-parallel plan (no tp_plan, no transformers base_model_tp_plan); "
        "give one as dist.tp_plan: {module-name pattern: colwise or rowwise}, or set dist.tensor_parallel=1",
    )


def matched(model: nn.Module, plan: Mapping[str, str]) -> dict[str, tuple[nn.Module, str]]:
    """The modules the plan splits: name -> (module, style); a style other than colwise/rowwise is
    left replicated (transformers' plans name some the launcher does not apply)."""
    for pattern, style in plan.items():
        if not isinstance(style, str):
            raise RecipeError("dist.tp_plan", f"{pattern}: expected colwise or rowwise, got {style!r}")
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        for pattern, style in plan.items():
            if style in STYLES and fnmatch.fnmatchcase(name, pattern):
                found[name] = (module, style)
                break
    return found


def check(model: nn.Module, plan: Mapping[str, str], tensor: int) -> None:
    """What splits over `tensor` ranks, checked before anything moves: a plan that matches nothing,
    a split module that is not a Linear, widths and attention heads that do not divide."""
    found = matched(model, plan)
    if not found:
        raise RecipeError(
            "dist.tp_plan",
            f"no module of {type(model).__name__} matches the tensor-parallel plan {dict(plan)}; "
            "name modules by their names in model.named_modules()",
        )
    for name, (module, style) in found.items():
        if not isinstance(module, nn.Linear):
            raise RecipeError(
                "dist.tp_plan", f"{name} is a {type(module).__name__}; colwise and rowwise split nn.Linear"
            )
        width = module.out_features if style == "colwise" else module.in_features
        if width % tensor:
            side = "outputs" if style == "colwise" else "inputs"
            raise RecipeError(
                KEY,
                f"{name} ({style}) has {width} {side}, which do not split over {tensor} ranks; "
                f"use a tensor_parallel that divides {width}",
            )
    _check_pairs(model, plan, found)
    for label, heads in _heads(model):
        if heads % tensor:
            raise RecipeError(
                KEY,
                f"{label} is {heads}, which does not split over {tensor} ranks; "
                f"use a tensor_parallel that divides {heads}",
            )


def _check_pairs(model: nn.Module, plan: Mapping[str, str], found: Mapping[str, tuple[nn.Module, str]]) -> None:
    """A column-wise layer leaves its output split by features, which only a row-wise layer reads
    (and a row-wise one needs such input): in each parent module (attention's q, k, v and its output
    projection; an MLP's two Linears), in the order the parent holds its Linears (its forward order,
    in torch's and transformers' models), each row-wise layer closes a region opened by column-wise
    ones, one of which gives as many outputs as it reads. A Linear of that parent left whole that
    reads the region's input (attention's q beside a split v) or its split output would meet the
    split tensors whole. Each such plan would pass every other check and fail at the first step on
    a shape."""
    parents = dict(model.named_modules())
    order = {name: i for i, name in enumerate(parents)}
    for parent_name in sorted({name.rpartition(".")[0] for name in found}, key=order.__getitem__):
        linears = [
            (f"{parent_name}.{child}" if parent_name else child, module)
            for child, module in parents[parent_name].named_children()
            if isinstance(module, nn.Linear)
        ]
        styles = {found[name][1] for name, _ in linears if name in found}
        region: list[tuple[str, nn.Linear]] = []  # the column-wise layers since the last row-wise one
        whole: list[tuple[str, nn.Linear, int]] = []  # the Linears left whole since then, after how many of those
        for name, module in linears:
            style = found[name][1] if name in found else None
            if style is None:
                whole.append((name, module, len(region)))
                continue
            if style == "colwise":
                region.append((name, module))
                continue
            if not region:
                hint = "swap the two styles" if "colwise" in styles else "add the Linear that splits its input"
                raise RecipeError(
                    "dist.tp_plan",
                    f"{name} (by {_pattern(name, plan)!r}) is split rowwise but no column-wise layer before it in "
                    f"{parent_name or 'the model'} splits its input: a row-wise layer reads the split output of a "
                    f"column-wise one; {hint} (e.g. an MLP's first Linear colwise, its second rowwise)",
                )
            _check_region(plan, name, module, region, whole)
            region, whole = [], []
        if region:
            name = region[-1][0]
            if "rowwise" not in styles:
                raise RecipeError(
                    "dist.tp_plan",
                    f"{name} is split colwise but no module beside it is split rowwise: add the Linear that "
                    "reads its split output to the plan as rowwise (e.g. an MLP's second Linear to its first)",
                )
            raise RecipeError(
                "dist.tp_plan",
                f"{name} (by {_pattern(name, plan)!r}) is split colwise but no row-wise layer after it in "
                f"{parent_name or 'the model'} reads its split output: swap the two styles "
                "(e.g. an MLP's first Linear colwise, its second rowwise)",
            )


def _check_region(
    plan: Mapping[str, str],
    name: str,
    rowwise: nn.Linear,
    region: list[tuple[str, nn.Linear]],
    whole: list[tuple[str, nn.Linear, int]],
) -> None:
    """The row-wise layer `name` reads what one of the column-wise `region` gives; no Linear left whole
    beside them reads their input (its output would meet theirs split) or their split output."""
    if not any(module.out_features == rowwise.in_features for _, module in region):
        gives = ", ".join(f"{n} gives {m.out_features}" for n, m in region)
        raise RecipeError(
            "dist.tp_plan",
            f"{name} (by {_pattern(name, plan)!r}) reads {rowwise.in_features} features split rowwise, but no "
            f"column-wise layer before it gives that many ({gives}): pair it with the Linear whose output it reads",
        )
    for other, module, after in whole:
        for i, (split, col) in enumerate(region):
            reads_output = i < after and module.in_features == col.out_features != col.in_features
            if module.in_features == col.in_features or reads_output:
                reads = "the split output of" if reads_output else "the same input as"
                pattern, leaf = _pattern(split, plan), split.rpartition(".")[2]
                suggested = pattern[: -len(leaf)] + other.rpartition(".")[2] if pattern.endswith(leaf) else other
                raise RecipeError(
                    "dist.tp_plan",
                    f"{other} is left whole but reads {reads} {split} (split colwise by {pattern!r}) before "
                    f"{name} (rowwise) joins the split: whole and split tensors would meet (as attention's q and k "
                    f"with its v); add {suggested!r}: colwise to the plan, or leave {split} whole too",
                )


def _pattern(name: str, plan: Mapping[str, str]) -> str:
    """The plan's pattern that splits `name` (matched() takes the first)."""
    return next(p for p, style in plan.items() if style in STYLES and fnmatch.fnmatchcase(name, p))


def describe_split(model: nn.Module, plan: Mapping[str, str], tensor: int) -> str:
    """What the plan splits, per pattern: `*.attn.qkv colwise: 6 Linears, *.attn.proj rowwise: 6
    Linears, ... over 2 ranks; the rest (embeddings, norms, head) whole on every rank`."""
    counts = dict.fromkeys(plan, 0)
    for name in matched(model, plan):  # each module by the first pattern that matches it, as matched() does
        counts[next(p for p in plan if plan[p] in STYLES and fnmatch.fnmatchcase(name, p))] += 1
    parts = [f"{pattern} {plan[pattern]}: {n} Linear{'s' if n != 1 else ''}" for pattern, n in counts.items() if n]
    return f"{', '.join(parts)} split over {tensor} ranks; every other parameter whole on each rank"


def split_params(model: nn.Module, plan: Mapping[str, str]) -> frozenset[int]:
    """The ids of the parameters the plan splits (the memory plan divides them by the degree)."""
    return frozenset(id(p) for module, _ in matched(model, plan).values() for p in module.parameters())


def apply(model: nn.Module, plan: Mapping[str, str], mesh: DeviceMesh) -> None:
    """parallelize_module over the tensor-parallel mesh: each matched Linear's weight (and bias)
    becomes a DTensor shard; inputs and outputs stay replicated around each column/row pair."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, mesh, {name: styles[style]() for name, (_, style) in matched(model, plan).items()})


def _heads(model: nn.Module) -> list[tuple[str, int]]:
    """Attention head counts the split must divide: the built-in GPT's blocks' n_heads, and a
    transformers config's query and key/value heads."""
    found = []
    for module in model.modules():
        heads = getattr(module, "n_heads", None)
        if isinstance(heads, int):
            found.append(("model.n_heads", heads))  # the built-in GPT's recipe key (every block alike)
            break
    config = getattr(model, "config", None)
    for attr in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            found.append((f"model.config.{attr}", value))
    return found
