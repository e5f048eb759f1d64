"""Reading a recipe file: YAML, strictly (YAML 1.2 floats, duplicate keys refused, alias expansion
bounded, binary files named), and `key.path=value` overrides applied on top. The schema that then
validates the result is launcher/recipe/schema.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import RecipeError

# a recipe is a few hundred values; YAML aliases can make a 3 KB file expand to billions ("billion laughs")
MAX_RECIPE_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """safe_load, but `3e-4` is a float (YAML 1.2) rather than the string PyYAML 1.1 makes of it,
    a key given twice in one mapping is an error (PyYAML keeps the last silently), and aliases
    cannot expand a small file into an enormous recipe."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = f"{key_node.start_mark.name}:{line}"
                    raise RecipeError(
                        where,
                        f"duplicate key {key!r} (first at line {seen[key]}, again at line {line}); "
                        "a later one would silently replace the earlier: keep one",
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once aliases are expanded (an alias counts its whole anchor
    each time); shared nodes are measured once, so this is linear in the file, not in the expansion."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias: counted once here, and rejected by the constructor
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, sizes) for v in node.value)
    else:
        total = 1
    sizes[id(node)] = min(total, 10 * MAX_RECIPE_VALUES)
    return sizes[id(node)]


def _load_yaml(text: str, name: str) -> Any:
    loader = _Loader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_RECIPE_VALUES:
            raise RecipeError(
                name,
                f"expands to more than {MAX_RECIPE_VALUES:,} values through YAML aliases (&anchor/*alias); "
                "a recipe this large is a mistake or an attack: write the values out",
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """A command-line value, typed as YAML would type it: `3e-4` -> float, `null` -> None."""
    try:
        return _load_yaml(text, "override")
    except (yaml.YAMLError, RecipeError):
        return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            str(path), "no such recipe file; pass the path to a .yaml recipe, e.g. recipes/quickstart.yaml"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), f"is not a text file (byte {e.start} is not UTF-8); pass a YAML recipe") from None
    if "\x00" in text:
        raise RecipeError(str(path), "is not a text file (it contains NUL bytes); pass a YAML recipe")
    try:
        data = _load_yaml(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(where, f"invalid YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(str(path), "is nested too deeply to be a recipe") from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a recipe must be a YAML mapping of sections (name, model, data, ...)")
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place, and returned)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(item, "an override must look like key.path=value, e.g. optimizer.lr=3e-4")
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise RecipeError(key, f"cannot set a key inside {prefix}, which is {child!r}, not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return raw
