"""The recipe's model and datasets, each built from its own random stream (rng.py) and checked to be
what the launcher needs, for `launcher run` and `launcher check` alike."""

from __future__ import annotations

from typing import Any

import torch

from launcher import rng
from launcher.components import instantiate
from launcher.errors import RecipeError
from launcher.recipe import Recipe


def build_datasets(recipe: Recipe) -> tuple[Any, Any]:
    """The training and validation datasets (validation: None if the recipe has none). They draw
    from their own stream, so that whatever they draw never shifts the model's initial weights."""
    rng.seed_everything(rng.derive_seed(recipe.seed, "data"))
    train_set = instantiate(recipe.data.train, "data.train")
    val_set = instantiate(recipe.data.val, "data.val") if recipe.data.val is not None else None
    for key, ds in (("data.train", train_set), ("data.val", val_set)):
        if ds is not None and not hasattr(ds, "__len__"):
            raise RecipeError(key, f"{type(ds).__name__} has no len(); the launcher needs a map-style dataset")
        if ds is not None and not hasattr(ds, "__getitem__"):
            raise RecipeError(
                f"{key}._component_",
                f"built a {type(ds).__name__}, which has no __getitem__; name a map-style torch Dataset",
            )
    return train_set, val_set


def build_model(recipe: Recipe) -> torch.nn.Module:
    """The model, initialised from `seed` alone: the same weights whatever was built before it."""
    rng.seed_everything(recipe.seed)
    return checked_model(instantiate(recipe.model, "model"), recipe)


def checked_model(model: Any, recipe: Recipe) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(
            "model._component_",
            f"{recipe.model['_component_']} built a {type(model).__name__}, "
            "not a torch.nn.Module; name a module class or a function that returns one",
        )
    return model
