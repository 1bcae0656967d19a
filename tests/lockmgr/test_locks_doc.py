"""docs/LOCKS.md and the code agree: the message tables of §3 list every ``Op`` with its
code, its fields in wire order and whether it is numbered, and the field table gives
every field the type ``FIELDS`` checks."""

import pathlib
import re

from lockmgr.messages import FIELDS, Op

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "LOCKS.md"


def tables() -> list[list[list[str]]]:
    """Every table of the document, as rows of cells (header and rule left out)."""
    out: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if rows is None:
            rows = []
            out.append([cells])        # the header, kept to find the table
        elif not set("".join(cells)) <= set("-: "):
            out[-1].append(cells)
    return out


def table(*header: str) -> list[list[str]]:
    (found,) = [t[1:] for t in tables() if tuple(t[0][:len(header)]) == header]
    return found


def names(cell: str) -> tuple[str, ...]:
    return tuple(re.findall(r"`([a-z_]+\??)`", cell))


def spec(op: Op) -> tuple[str, ...]:
    n = len(op.fields)
    return tuple(f + ("?" if i >= n - op.optional else "") for i, f in enumerate(op.fields))


def test_message_tables_match_op():
    client = table("op", "code", "fields", "answer")
    server = table("op", "code", "fields", "numbered")
    for rows, from_client in ((client, True), (server, False)):
        documented = {r[0]: r for r in rows}
        assert documented.keys() == {op.name for op in Op if (op < 64) == from_client}
        for name, row in documented.items():
            op = Op[name]
            assert int(row[1]) == op, name
            assert names(row[2]) == spec(op), name
            if not from_client:
                assert (row[3] == "✓") == op.numbered, name


def test_field_table_matches_fields():
    rows = table("field", "type", "meaning")
    documented = {names(r[0])[0]: r[1] for r in rows}
    assert len(documented) == len(rows)
    assert documented == {f: k.what for f, k in FIELDS.items()}
    used = {f for op in Op for f in op.fields}
    assert used == FIELDS.keys()
