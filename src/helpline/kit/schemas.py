"""Base schemas shared by every domain."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


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
