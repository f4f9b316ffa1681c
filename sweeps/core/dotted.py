"""Trainer settings as nested mappings (the YAML a user writes) and as dotted keys
(`optimiser.lambda_rate`: axes, MLflow params, stage keys): the one set of conversions."""

from __future__ import annotations

import copy
from typing import Any


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'model': {'scale': False}}` -> `{'model.scale': False}`. Lists stay values; an empty
    mapping sets nothing, so it has no key (stage keys and MLflow params have always read it so)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """`{'optimiser.lambda_rate': 0.1}` -> `{'optimiser': {'lambda_rate': 0.1}}` (the inverse of `flatten`)."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        nested = deep_merge(nested, {head: nest({rest: value})} if rest else {head: value})
    return nested


def deep_merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; nested mappings merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged
