"""A recipe's validation errors as one line each: pydantic's error -> `RecipeError` naming the
dotted key, what it expects and, for a typo, the closest valid word."""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from launcher.errors import RecipeError


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _leaf_loc(loc: tuple, root: type[BaseModel]) -> tuple[list[str], type[BaseModel] | None, Any]:
    """Walk `loc` through the schema; drop pydantic's union-member tags. Returns (path, parent model, field)."""
    model: type[BaseModel] | None = root
    path: list[str] = []
    parent, field = None, None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if model is not None and isinstance(part, str):
                # an unknown key inside a section: keep it, it is what the user typed
                path.append(part)
                parent = model
            break
        path.append(part)
        parent, field = model, model.model_fields[part]
        model = _section_type(field.annotation)
    return path, parent, field


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping of key: value",
    "model_type": "a section (a mapping of key: value)",
    "list_type": "a list",
    "finite_number": "a finite number",
}


def to_recipe_error(exc: ValidationError, root: type[BaseModel]) -> RecipeError:
    """pydantic's first error, as one line naming the recipe key (`root`: the schema it validated)."""
    errors = exc.errors()
    # an unknown key first: `optimiser:` is the cause of "optimizer: required key is missing"
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path, parent, _ = _leaf_loc(first["loc"], root)
    key = ".".join(path) or "recipe"
    kind, value = first["type"], first.get("input")
    if kind == "extra_forbidden":
        valid = list(parent.model_fields) if parent else []
        return RecipeError(key, f"unknown key{suggest(path[-1], valid)} (valid keys here: {', '.join(valid)})")
    if kind == "missing":
        return RecipeError(key, "required key is missing; add it to the recipe or pass it as an override")
    # one field can fail several union members: name every type it would accept
    same = [e for e in errors if _leaf_loc(e["loc"], root)[0] == path]
    wanted: list[str] = []
    for e in same:
        if e["type"] == "literal_error":
            wanted.append("one of " + e["ctx"]["expected"].replace(" or ", ", "))
        elif e["type"] in _TYPE_WORDS:
            wanted.append(_TYPE_WORDS[e["type"]])
        elif e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            wanted.append(e["msg"].replace("Input should be ", "a value "))
        elif e["type"] == "none_required":
            wanted.append("null")
        else:
            wanted.append(e["msg"])
    wanted = list(dict.fromkeys(wanted))
    hint = ""
    if kind == "literal_error" and isinstance(value, str):
        options = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        hint = suggest(value, options)
    return RecipeError(key, f"expected {' or '.join(wanted)}, got {value!r}{hint}")
