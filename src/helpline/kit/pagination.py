"""Keyset pagination: opaque cursors over an ordering by one column plus `id`.

A cursor encodes the last item's sort value and id; the next page is everything strictly after
that pair in the ordering, so a walk returns no item twice and skips none (except rows that
changed their sort value during the walk).
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from helpline.core.errors import BadRequest

Direction = Literal["asc", "desc"]


class InvalidCursor(BadRequest):
    code = "BAD_REQUEST"
    message = "Invalid pagination cursor"


@dataclass(frozen=True, slots=True)
class Cursor:
    value: Any
    id: uuid.UUID

    def encode(self) -> str:
        value = self.value.isoformat() if isinstance(self.value, datetime) else self.value
        raw = orjson.dumps({"v": value, "i": str(self.id)})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, *, value_is_datetime: bool) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = orjson.loads(raw)
            value = data["v"]
            if value_is_datetime:
                value = datetime.fromisoformat(value)
            return cls(value=value, id=uuid.UUID(data["i"]))
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise InvalidCursor(details={"cursor": token}) from exc


def paginate(
    statement: Select[Any],
    *,
    sort_column: InstrumentedAttribute[Any],
    id_column: InstrumentedAttribute[Any],
    cursor: str | None,
    limit: int,
    direction: Direction = "desc",
    value_is_datetime: bool = True,
) -> Select[Any]:
    """Order `statement` by (sort, id) and keep the rows after `cursor`; fetches `limit + 1`."""
    if cursor:
        after = Cursor.decode(cursor, value_is_datetime=value_is_datetime)
        if direction == "desc":
            condition = or_(
                sort_column < after.value, and_(sort_column == after.value, id_column < after.id)
            )
        else:
            condition = or_(
                sort_column > after.value, and_(sort_column == after.value, id_column > after.id)
            )
        statement = statement.where(condition)
    if direction == "desc":
        statement = statement.order_by(sort_column.desc(), id_column.desc())
    else:
        statement = statement.order_by(sort_column.asc(), id_column.asc())
    return statement.limit(limit + 1)


def split_page(rows: list[Any], *, limit: int, sort_attr: str) -> tuple[list[Any], str | None]:
    """Cut the extra row fetched by `paginate` and build the cursor for the next page."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    last = page[-1]
    return page, Cursor(value=getattr(last, sort_attr), id=last.id).encode()
