"""Writes the configuration reference of docs/configuration.md from the pydantic schema.

The reference lists every field of ``rdml_dist.config.ExperimentConfig``, nested models walked,
with its dotted path, type and constraints, default and description, so the page cannot drift
from the schema: ``mkdocs build`` (docs/hooks.py) and tests/unit/test_docs.py fail when the
committed page differs from what this script writes.

    python docs/gen_config_reference.py          # rewrite the generated part of the page
    python docs/gen_config_reference.py --check  # exit 1 when the page is stale
"""

import argparse
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

PAGE = Path(__file__).with_name("configuration.md")
BEGIN = "<!-- BEGIN GENERATED: python docs/gen_config_reference.py -->"
END = "<!-- END GENERATED -->"
_CONSTRAINTS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string", Any: "any"}


class Section(NamedTuple):
    """One nested model: its dotted path, what it is for, and the rows of its own (non-model) fields."""

    path: str
    about: str
    rows: list[tuple[str, str, str, str]]


def _model_inside(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """The model an annotation holds, whether it is a list of them, and whether it may be null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, False
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True, False
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            return inner[0], False, True
    return None, False, False


def type_text(annotation: Any) -> str:
    """A reader's name for a field's type: ``one of `a`, `b```, ``float or null``, ``list of int``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args)
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraint_text(info: FieldInfo) -> str:
    """The range a field's value must lie in, from its pydantic metadata: ``≥ 0, < 1, finite``."""
    parts = []
    for item in info.metadata:
        for attribute, symbol in _CONSTRAINTS:
            if getattr(item, attribute, None) is not None:
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} item{'s' if item.min_length != 1 else ''}")
        if getattr(item, "allow_inf_nan", None) is False:
            parts.append("finite")
    return ", ".join(parts)


def default_text(info: FieldInfo) -> str:
    """The default as it would be written in the YAML file, or ``required``."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, enum.Enum):
        value = value.value
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1000).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _about(info: FieldInfo | None, model: type[BaseModel]) -> str:
    """A section's intro sentence: the field's description, else the first paragraph of the model's docstring."""
    if info is not None and info.description:
        text = _cell(info.description)
    else:
        text = _cell((model.__doc__ or "").strip().split("\n\n")[0].replace("``", "`"))
    if not text:
        return ""
    return text[0].upper() + text[1:] + ("" if text.endswith((".", ":")) else ".")


def registered_names() -> dict[str, tuple[str, ...]]:
    """The fields whose values name a registry entry, with the names registered now (listed here, never by hand)."""
    from rdml_dist.data.registry import SOURCES
    from rdml_dist.divergence import DIVERGENCES
    from rdml_dist.models import MODEL_NAMES

    return {"students[].model": MODEL_NAMES, "data.name": tuple(SOURCES), "mimicry.divergence": tuple(DIVERGENCES)}


def _described(dotted: str, field: FieldInfo) -> str:
    """A field's description, with the registered names where its value names one."""
    names = registered_names().get(dotted)
    text = field.description or ""
    return f"{text}; registered: {', '.join(f'`{name}`' for name in names)}" if names else text


def sections(model: type[BaseModel], path: str = "", info: FieldInfo | None = None) -> list[Section]:
    """Every nested model reachable from ``model`` as a section, depth first in field order."""
    own = Section(path, _about(info, model), [])
    nested: list[Section] = []
    for name, field in model.model_fields.items():
        dotted = f"{path}.{name}" if path else name
        inner, is_list, nullable = _model_inside(field.annotation)
        if inner is None or is_list or nullable:
            kind = type_text(field.annotation)
            if inner is not None:
                kind = f"list of mappings (`{dotted}[]` below)" if is_list else f"mapping (`{dotted}` below) or null"
            limits = constraint_text(field)
            own.rows.append((f"`{dotted}`", _cell(kind + (f", {limits}" if limits else "")), default_text(field),
                             _cell(_described(dotted, field))))
        if inner is not None:
            nested += sections(inner, f"{dotted}[]" if is_list else dotted, field)
    return [own, *nested]


def render(model: type[BaseModel]) -> str:
    """The generated part of the page: one table per nested model."""
    lines = []
    for section in sections(model):
        lines += [f"## `{section.path}`" if section.path else "## Top level", ""]
        if section.about:
            lines += [section.about, ""]
        if section.rows:
            lines += ["| field | type | default | description |", "|---|---|---|---|"]
            lines += [f"| {' | '.join(row)} |" for row in section.rows]
            lines.append("")
    return "\n".join(lines)


def experiment_schema() -> type[BaseModel]:
    from rdml_dist.config import ExperimentConfig

    return ExperimentConfig


def with_fresh_reference(page_text: str, reference: str) -> str:
    """The page with the text between its markers replaced by ``reference``."""
    head, begin, rest = page_text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{PAGE} must contain the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n\n{reference}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page differs from the schema")
    args = parser.parse_args(argv)
    current = PAGE.read_text()
    fresh = with_fresh_reference(current, render(experiment_schema()))
    if args.check:
        if fresh != current:
            print(f"{PAGE} is stale: run python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
