"""Pydantic's validation errors as lines a person can act on, for the config and sidecars.

``key.path: reason``, one per problem: an unknown key names the nearest known one ("lable:
unknown key; did you mean label?"), and a box or point of the wrong length says what it needs
("bbox needs 4 numbers [x0, y0, x1, y1]") instead of pydantic's "bbox.3: Field required".
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ValidationError

#: how each fixed-length field is written, by its key
_FORMS = {
    "bbox": ("bbox", "[x0, y0, x1, y1]"), "region": ("region", "[x, y, width, height]"),
    "color": ("color", "[r, g, b]"), "points": ("each point", "[x, y]"), "point_coords": ("each point", "[x, y]"),
    "positive_bboxes": ("each box", "[x0, y0, x1, y1]"), "negative_bboxes": ("each box", "[x0, y0, x1, y1]"),
    "boxes_xywh": ("each box", "[x, y, width, height]"),
}
_LENGTH_ERRORS = {"missing", "too_long", "too_short"}


def describe_validation_error(error: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem, ``key.path: reason``; ``model`` (the validated class) adds the
    nearest known key to an unknown one and the length a box or point needs."""
    lines: list[str] = []
    for problem in error.errors():
        loc = tuple(problem["loc"])
        reason = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            reason = "unknown key" + _suggestion(model, loc)
        elif problem["type"] in _LENGTH_ERRORS and (fixed := _fixed_length(model, loc, problem["type"])):
            loc, reason = fixed
        line = f"{'.'.join(str(part) for part in loc) or '(top level)'}: {reason}"
        if line not in lines:  # a 2-number bbox is two missing items: one line
            lines.append(line)
    return lines


def _suggestion(model: type[BaseModel] | None, loc: tuple) -> str:
    if model is None or not loc or not isinstance(loc[-1], str):
        return ""
    parent = _type_at(model, loc[:-1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return ""
    close = difflib.get_close_matches(loc[-1], sorted(_names(parent)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _fixed_length(model: type[BaseModel] | None, loc: tuple, kind: str) -> tuple[tuple, str] | None:
    if model is None:
        return None
    field_loc = loc[:-1] if kind == "missing" and loc and isinstance(loc[-1], int) else loc
    target = _type_at(model, field_loc)
    if get_origin(target) is not tuple or ... in get_args(target):
        return None
    key = next((part for part in reversed(field_loc) if isinstance(part, str)), "")
    what, form = _FORMS.get(key, (key, ""))
    return field_loc, f"{what} needs {len(get_args(target))} numbers {form}".rstrip()


def _names(model: type[BaseModel]) -> set[str]:
    return {name for key, field in model.model_fields.items() for name in {key} | _names_of_field(field)}


def _field(model: type[BaseModel], key: str) -> Any:
    for name, field in model.model_fields.items():
        if key == name or key in _names_of_field(field):
            return field.annotation
    return None


def _names_of_field(field: Any) -> set[str]:
    """The other keys a field is read from (samapi's spellings)."""
    alias = field.validation_alias
    names = {choice for choice in alias.choices if isinstance(choice, str)} if isinstance(alias, AliasChoices) else {alias}
    return (names | {field.alias}) - {None}


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _type_at(model: type[BaseModel], loc: tuple) -> Any:
    """The annotation at ``loc`` (keys and indices) inside ``model``; None when it cannot be told."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        origin, args = get_origin(current), get_args(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            current = _field(current, part)
        elif origin is dict and args:
            current = args[1]
        elif origin is list and args and isinstance(part, int):
            current = args[0]
        elif origin is tuple and args and isinstance(part, int):
            current = args[0] if ... in args else args[part] if part < len(args) else None
        else:
            return None
        if current is None:
            return None
    return _unwrap(current)
