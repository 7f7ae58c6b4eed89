"""Files the package ships besides code: the Hub card templates (``hub/`` in a checkout,
``timm_splat/cards`` in a wheel)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def card_template(name: str) -> Path | None:
    """A card template from hub/: the checkout's, or the copy a wheel carries."""
    for folder in (_PACKAGE.parent / "hub", _PACKAGE / "cards"):
        if (folder / name).is_file():
            return folder / name
    return None
