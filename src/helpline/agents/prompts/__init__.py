"""System prompts of the answerers, as Markdown files next to this module.

Kept as files so they read (and diff) as prose; loaded with `importlib.resources`, which also
works from a wheel or a zip.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load_prompt(name: str) -> str:
    """The text of `prompts/<name>.md`, without surrounding whitespace."""
    return resources.files(__name__).joinpath(f"{name}.md").read_text(encoding="utf-8").strip()
