"""Column names of the event contract (docs/DESIGN.md, 'Events'), shared by every stage.

A normalized event row: `event_id` (unique int64), `user_id`, `item_id`, `category`, `surface`,
`ts` (int64 seconds or order), `label` (0/1), plus optional categorical context columns listed in
the events manifest. After the split, `*_idx` columns hold vocabulary indices (0 = padding,
1 = out of vocabulary, 2.. = known ids), which is what models consume.
"""

from __future__ import annotations

import pyarrow as pa

EVENT_ID = "event_id"
USER_ID = "user_id"
ITEM_ID = "item_id"
CATEGORY = "category"
SURFACE = "surface"
TS = "ts"
LABEL = "label"

REQUIRED = (USER_ID, ITEM_ID, TS, LABEL)
OPTIONAL = (EVENT_ID, CATEGORY, SURFACE)  # 0 when the log lacks them; event ids are derived
SPLITS = ("train", "valid", "test")

PAD_INDEX = 0
OOV_INDEX = 1

EVENT_SCHEMA = pa.schema(
    [
        (EVENT_ID, pa.int64()),
        (USER_ID, pa.int64()),
        (ITEM_ID, pa.int64()),
        (CATEGORY, pa.int64()),
        (SURFACE, pa.int32()),
        (TS, pa.int64()),
        (LABEL, pa.int8()),
    ]
)


def event_schema(categorical: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """The normalized events' schema: the contract columns plus int64 categorical context."""
    return pa.schema([*EVENT_SCHEMA, *[(name, pa.int64()) for name in categorical]])


def idx(column: str) -> str:
    """Name of the vocabulary-index column of `column`."""
    return f"{column}_idx"
