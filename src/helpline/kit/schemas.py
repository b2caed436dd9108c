"""Base schemas shared by every domain."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict

T = TypeVar("T")


def _refuse_nul(value: str) -> str:
    # PostgreSQL's text cannot hold U+0000: refused here with a clear error, not at the INSERT.
    if "\x00" in value:
        raise ValueError("Text must not contain NUL characters (U+0000)")
    return value


# Refuses in text what the databases cannot store. The last of a type's annotations: before
# `StringConstraints`, it would make pydantic check lengths before stripping.
STORABLE = AfterValidator(_refuse_nul)
StoredText = Annotated[str, STORABLE]


class Schema(BaseModel):
    """Response and request models: built from ORM objects, unknown fields refused."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")


class Page(BaseModel, Generic[T]):
    """A keyset-paginated list (`next_cursor` is null on the last page)."""

    items: list[T]
    next_cursor: str | None = None


class ItemList(BaseModel, Generic[T]):
    """An unpaginated list."""

    items: list[T]
