"""Command-line flags made from a config dataclass's fields, so a program's options are written
once (the field, its default and its help) and its ``run`` only builds the config."""

from __future__ import annotations

import argparse
import dataclasses


def _kind(field: dataclasses.Field) -> type:
    """The Python type a field's annotation names (annotations are strings here)."""
    annotation = str(field.type)
    for kind in (bool, int, float):
        if kind.__name__ in annotation.replace("|", " ").split():
            return kind
    return str


def add_config_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """One ``--flag`` per field (``--batch-size`` for ``batch_size``); fields without a default
    are required. A field's ``metadata`` holds its help text and argparse extras (choices,
    nargs)."""
    for field in dataclasses.fields(config_class):
        extra = dict(field.metadata)
        flag = "--" + field.name.replace("_", "-")
        kind = _kind(field)
        if kind is bool:
            parser.add_argument(flag, action="store_true", **extra)
            continue
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        default = None
        if not required:
            has_factory = field.default_factory is not dataclasses.MISSING
            default = field.default_factory() if has_factory else field.default
        if default is not None:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            extra["help"] = f"{extra.get('help', '')} (default: {shown})".strip()
        parser.add_argument(flag, type=kind, required=required, default=default, **extra)


def config_from_args(config_class, args: argparse.Namespace):
    """The config holding what the flags said."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})
