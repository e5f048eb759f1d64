"""The recipe's model, datasets and data loaders: the model and datasets each built from its own
random stream (rng.py) and checked to be what the launcher needs, for `launcher run` and `launcher
check` alike; the loaders sharded by the plan."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from launcher import rng
from launcher.data import batches, streaming
from launcher.data.loading import Positioned, SeededDataset, ShardSampler, build_loader
from launcher.data.plan import Plan, batch_shape
from launcher.errors import ArgumentError, RecipeError
from launcher.recipe.components import instantiate
from launcher.recipe.schema import Recipe, component_spec


def build_datasets(recipe: Recipe) -> tuple[Any, Any]:
    """The training and validation datasets (validation: None if the recipe has none). They draw
    from their own stream, so that whatever they draw never shifts the model's initial weights."""
    rng.seed_everything(rng.derive_seed(recipe.seed, "data"))
    train_set = instantiate(recipe.data.train, "data.train")
    val_set = instantiate(recipe.data.val, "data.val") if recipe.data.val is not None else None
    if val_set is not None and streaming.is_stream(val_set):
        raise RecipeError(
            "data.val", "evaluation needs a map-style dataset (with len and indexing); a streamed one has no end"
        )
    if streaming.is_stream(train_set) and next(iter(train_set), None) is None:  # read in order: its first sample
        raise RecipeError("data.train", f"the stream {type(train_set).__name__} yields no sample; point it at data")
    for key, ds in (("data.train", train_set), ("data.val", val_set)):
        if key == "data.train" and streaming.is_stream(ds):
            continue  # read in order: launcher/data/streaming.py
        if ds is not None and not hasattr(ds, "__len__"):
            raise RecipeError(key, f"{type(ds).__name__} has no len(); the launcher needs a map-style dataset")
        if ds is not None and not hasattr(ds, "__getitem__"):
            raise RecipeError(
                f"{key}._component_",
                f"built a {type(ds).__name__}, which has no __getitem__; name a map-style torch Dataset",
            )
    first = _first_sample(train_set) if recipe.loss is None else None
    if first is not None and not isinstance(first, Mapping):
        raise batches.no_loss_for(first)
    return train_set, val_set


def _first_sample(dataset: Any) -> Any:
    if streaming.is_stream(dataset):
        return next(iter(dataset), None)
    return dataset[0] if len(dataset) > 0 else None


def train_samples(recipe: Recipe, train_set: Any, dp_size: int) -> int:
    """The training set's size; a stream has none: max_steps x the global batch, every step full."""
    if not streaming.is_stream(train_set):
        return len(train_set)
    if recipe.train.max_steps is None or recipe.train.epochs is not None:
        raise RecipeError(
            "train.max_steps",
            "a streamed dataset has no length, so epochs cannot be counted: set train.max_steps "
            "(and leave train.epochs unset)",
        )
    return recipe.train.max_steps * batch_shape(recipe, dp_size).global_batch


def build_collate(recipe: Recipe) -> Callable[[list[Any]], Any] | None:
    """data.collate: what turns a list of samples into a batch (padding); None: torch's default."""
    if recipe.data.collate is None:
        return None
    collate = instantiate(recipe.data.collate, "data.collate")
    if not callable(collate):
        raise RecipeError(
            "data.collate._component_",
            f"built a {type(collate).__name__}, which cannot be called; name a function of a list of samples",
        )
    return collate


def build_model(recipe: Recipe) -> torch.nn.Module:
    """The model, initialised from `seed` alone: the same weights whatever was built before it."""
    rng.seed_everything(recipe.seed)
    model = checked_model(instantiate(component_spec(recipe, "model") or recipe.model, "model"), recipe)
    if recipe.model.get("peft") is not None:  # adapters: only they train (launcher/models/hf.py)
        from launcher.models import hf

        config = instantiate(recipe.model["peft"], "model.peft")
        try:
            model = hf.with_adapters(model, config)
        except ArgumentError as e:  # the config against this model: named under model.peft
            raise RecipeError(f"model.peft.{e.argument}" if e.argument else "model.peft", str(e)) from None
    return model


def checked_model(model: Any, recipe: Recipe) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(
            "model._component_",
            f"{recipe.model['_component_']} built a {type(model).__name__}, "
            "not a torch.nn.Module; name a module class or a function that returns one",
        )
    return model


def build_loaders(
    recipe: Recipe,
    plan: Plan,
    train_set: Any,  # a map-style Dataset, or an iterable read in order (streaming.is_stream)
    val_set: Dataset | None,
    *,
    ranks: list[int],
    rank: int,
    world_size: int,
    device: torch.device,
    signals: list[signal.Signals],
) -> tuple[list[tuple[int, Positioned, DataLoader]], DataLoader | None]:
    """One training shard (rank, sampler, loader) per rank this process trains: its own, or each
    simulated rank's (`ranks`); and this process's (`rank` of `world_size`) validation shard."""
    d = recipe.data
    pin = d.pin_memory if d.pin_memory is not None else device.type == "cuda"
    loader = functools.partial(
        build_loader,
        batch_size=plan.micro_batch,
        num_workers=d.num_workers,
        pin_memory=pin,
        prefetch_factor=d.prefetch_factor,
        ignore_signals=tuple(signals),
        collate_fn=build_collate(recipe),
    )
    shards: list[tuple[int, Positioned, DataLoader]] = []
    if streaming.is_stream(train_set):  # read in order, each rank keeping its share (launcher/data/streaming.py)
        for r in ranks:
            stream = streaming.Stream(train_set, rank=r, world_size=plan.dp_size, micro_batch=plan.micro_batch)
            shards.append((r, stream, loader(stream, None, seed=recipe.seed + r)))
        return shards, _val_loader(recipe, val_set, loader, rank, world_size)
    seeded = SeededDataset(train_set, recipe.seed)
    for r in ranks:
        sampler = ShardSampler(
            train_set,
            num_replicas=plan.dp_size,
            rank=r,
            shuffle=d.shuffle,
            seed=recipe.seed if d.seed is None else d.seed,
            drop_last=d.drop_last,
            stop=plan.shard_stop,
            with_epoch=True,
        )
        shards.append((r, sampler, loader(seeded, sampler, seed=recipe.seed + r)))
    return shards, _val_loader(recipe, val_set, loader, rank, world_size)


def _val_loader(
    recipe: Recipe, val_set: Dataset | None, loader: Callable[..., DataLoader], rank: int, world_size: int
) -> DataLoader | None:
    if val_set is None:
        return None
    # evaluation sums over samples: a simulated run evaluates unsharded
    val_sampler = ShardSampler(
        val_set, num_replicas=world_size, rank=rank, shuffle=False, seed=recipe.seed, drop_last=False
    )
    return loader(val_set, val_sampler, seed=recipe.seed + rank)
