"""Which tables and columns does a SQL query touch? Answered from DuckDB's own parse tree.

The trace's DuckDB views are Arrow tables holding only the columns loaded so far. Before a
query runs, the trace loads the columns the query names. The answer over-approximates on
purpose: a name is loaded from every table that has a column of that name, `*` loads every
column of every table mentioned, and a statement DuckDB cannot serialise (DESCRIBE, SHOW,
PRAGMA, ...) loads every column of every table whose name appears in its text.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from samplescope.analysis.errors import QueryError

__all__ = ["QueryNames", "check_statements", "query_names", "sandboxed_connection"]

# A trace's connection is a query engine over the trace, not a shell: no file or network
# access, no extensions, and the settings locked so a query cannot turn any of it back on.
# The trace's own tables are registered from Python objects (Arrow), which these leave open.
_SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "lock_configuration": True,
}
# Statements that only read. PRAGMA and CALL run table functions (pragma_table_info); the
# locked configuration stops the ones that would change a setting.
_READING = ("SELECT", "EXPLAIN", "PRAGMA", "CALL")


# DuckDB's memory limit (its default is 80% of the machine's memory, which on a shared
# machine leaves nothing for the trace's Python side), and where it spills past it: a folder
# of its own under the system's temporary folder, which DuckDB creates when it first spills
# and removes when the connection closes. Without a temp_directory an in-memory connection
# cannot spill at all: at 40M visits the importance source (~3.7 GB) then ran out of memory.
MEMORY_ENV = "SAMPLESCOPE_DUCKDB_MEMORY"
DEFAULT_MEMORY_LIMIT = "2GB"
_SPILL_NUMBER = itertools.count()


def sandboxed_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with external access, extensions and settings locked,
    its memory limited (`MEMORY_ENV`, default `DEFAULT_MEMORY_LIMIT`) and spilling to disk.

    Raises:
        QueryError: `MEMORY_ENV` is not a DuckDB memory size (e.g. 2GB, 512MB).
    """
    limit = os.environ.get(MEMORY_ENV, "").strip() or DEFAULT_MEMORY_LIMIT
    spill = Path(tempfile.gettempdir()) / f"samplescope-duckdb-{os.getpid()}-{next(_SPILL_NUMBER)}"
    config = {**_SANDBOX, "memory_limit": limit, "temp_directory": str(spill)}
    try:
        return duckdb.connect(config=config)
    except duckdb.Error as exc:
        msg = f"{MEMORY_ENV}={limit!r} is not a DuckDB memory limit (e.g. 2GB): {exc}"
        raise QueryError(msg.splitlines()[0]) from None


def check_statements(query: str, con: duckdb.DuckDBPyConnection) -> None:
    """Refuse empty SQL and any statement that is not a read (DROP, CREATE, SET, COPY, ...).

    The trace's tables are views the session rebuilds as queries need columns; a statement
    that replaces or drops one would break every later query, and the answer would be wrong.

    Raises:
        QueryError: empty text, a syntax error, or a statement that is not a read.
    """
    if not query.strip():
        msg = "empty SQL query; give a statement such as SELECT count(*) FROM visits"
        raise QueryError(msg)
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = f"SQL syntax error: {first}"
        raise QueryError(msg) from None
    if not statements:
        msg = "empty SQL query; give a statement such as SELECT count(*) FROM visits"
        raise QueryError(msg)
    for statement in statements:
        kind = statement.type.name
        if kind not in _READING:
            msg = (
                f"{kind} statements are not allowed: SQL over a trace only reads its tables "
                "(SELECT, EXPLAIN, DESCRIBE, SUMMARIZE); export results with --output"
            )
            raise QueryError(msg)


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
