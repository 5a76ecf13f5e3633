"""Strings from a trace are data, never markup."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.table import Table
from matplotlib.text import Text
from matplotlib.ticker import FixedFormatter, FuncFormatter, StrMethodFormatter

__all__ = ["escape_math"]

# Formatters whose labels are given strings (set_yticks(ticks, labels) makes a FuncFormatter);
# numeric ones (Scalar, Log) make their own mathtext and are left alone.
_LABELS = (FixedFormatter, FuncFormatter, StrMethodFormatter)


def escape_math(fig: Figure) -> Figure:
    """Escape every ``$`` in the texts of `fig`, just before it is drawn.

    Matplotlib reads a pair of ``$`` as mathtext: a layer named ``a$b$c``, a config value or
    a file name with dollars broke a page (parse errors, a RecursionError). The report's own
    labels never use mathtext (Unicode ρ, ², ‖ instead), so a ``$`` in a text or a fixed tick
    label can only come from the trace. Done once per page, here, it cannot miss a call site;
    tick labels that formatters make while drawing (log axes' 10^x) are made later and keep
    their mathtext.
    """
    texts = list(fig.findobj(Text))
    for table in fig.findobj(Table):  # a table's cells hold their texts outside findobj
        texts += [cell.get_text() for cell in table.get_celld().values()]
    for text in texts:
        value = text.get_text()
        if "$" in value:
            text.set_text(_escaped(value))
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            for get, set_ in (
                (axis.get_major_formatter, axis.set_major_formatter),
                (axis.get_minor_formatter, axis.set_minor_formatter),
            ):
                formatter = get()
                if isinstance(formatter, _LABELS) and not getattr(formatter, "_escapes", False):
                    escaping = FuncFormatter(lambda x, pos, f=formatter: _escaped(f(x, pos)))
                    escaping._escapes = True  # type: ignore[attr-defined]
                    set_(escaping)
    return fig


def _escaped(value: str) -> str:
    # Unescape first so a text seen twice is not escaped twice.
    return value.replace(r"\$", "$").replace("$", r"\$")
