"""Which tables and columns does a SQL query touch? Answered from DuckDB's own parse tree.

The trace's DuckDB views are Arrow tables holding only the columns loaded so far. Before a
query runs, the trace loads the columns the query names. The answer over-approximates on
purpose: a name is loaded from every table that has a column of that name, `*` loads every
column of every table mentioned, and a statement DuckDB cannot serialise (DESCRIBE, SHOW,
PRAGMA, ...) loads every column of every table whose name appears in its text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import duckdb

from samplescope.analysis.errors import QueryError

__all__ = ["QueryNames", "query_names"]


@dataclass
class QueryNames:
    """The identifiers a query uses, lower-cased."""

    tables: set[str] = field(default_factory=set)
    columns: set[str] = field(default_factory=set)
    star: bool = False


def _walk(node: Any, names: QueryNames) -> None:
    if isinstance(node, dict):
        if node.get("class") in ("STAR", "COLUMNS"):
            names.star = True
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            names.tables.add(node["table_name"].lower())
        for key in ("column_names", "using_columns"):
            for name in node.get(key) or []:
                if isinstance(name, str):
                    names.columns.add(name.lower())
        for value in node.values():
            _walk(value, names)
    elif isinstance(node, list):
        for value in node:
            _walk(value, names)


def query_names(
    query: str, known_tables: set[str], con: duckdb.DuckDBPyConnection | None = None
) -> QueryNames:
    """Parse `query` and return the tables and columns it may use.

    Args:
        query: the SQL text.
        known_tables: the trace's table names.
        con: a connection to parse with (a new one is made when None).

    Raises:
        QueryError: the query does not parse.
    """
    own = con is None
    con = duckdb.connect() if con is None else con
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0]
    finally:
        if own:
            con.close()
    tree = json.loads(raw)
    names = QueryNames()
    if not tree.get("error"):
        _walk(tree.get("statements", []), names)
        # CTEs and subqueries may hide a table inside a name the walk saw; the regex catches it.
        names.tables |= _mentioned(query, known_tables)
        return names
    if tree.get("error_type") == "parser":
        msg = f"SQL syntax error: {tree.get('error_message', 'cannot parse the query')}"
        raise QueryError(msg)
    # Not a SELECT (DESCRIBE, SUMMARIZE, SHOW ...): load all of every table it mentions.
    names.tables = _mentioned(query, known_tables)
    names.star = True
    return names


def _mentioned(query: str, known_tables: set[str]) -> set[str]:
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", query.lower()))
    return words & known_tables
