"""What a person reads on the pages: epochs, panels, axes, legends, labels, optional pages.

Each test builds the figures of one section from a small trace written with h5py and
checks the drawn matplotlib objects, so a regression names the page and the element.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from reporttraces import write_outputs_trace

from samplescope.analysis import open_trace
from samplescope.reports import (
    alignment,
    candidates,
    classes,
    correlation,
    curves,
    deciles,
    heatmaps,
    labelflags,
)
from samplescope.reports._data import ReportData
from samplescope.reports.candidates import draw_thumbnail
from samplescope.reports.render import SECTIONS, plan_report


def _data(path: Path) -> ReportData:
    trace = open_trace(path)
    return ReportData(trace, path)


def _pages(section, data: ReportData) -> list[Figure]:
    figures = list(section.pages(data))
    for fig in figures:
        FigureCanvasAgg(fig).draw()
    return figures


def _epoch_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_xlabel().startswith("epoch")]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> ReportData:
    return _data(write_outputs_trace(tmp_path_factory.mktemp("t") / "two.h5", epochs=2))


@pytest.mark.parametrize("section", [curves, heatmaps, correlation])
def test_epoch_ticks_are_whole_and_one_based(section, two_epochs: ReportData) -> None:
    # On main a 2-epoch run showed ticks -0.5, 0.0, 0.5, 1.0, 1.5.
    axes = [ax for fig in _pages(section.SECTION, two_epochs) for ax in _epoch_axes(fig)]
    assert axes
    for ax in axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1.0, 2.0], (ax.get_title(), ticks)


def test_epoch_columns_are_one_based(two_epochs: ReportData) -> None:
    assert two_epochs.epochs == [1, 2]
    assert two_epochs.train_epochs["epoch"].to_list() == [1, 2]
    assert set(two_epochs.correlations["epoch"].to_list()) == {1, 2}


def _panel_titles(data: ReportData) -> list[str]:
    (fig,) = _pages(curves.SECTION, data)
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_curves_drop_the_duplicate_panel_when_lr_is_constant(
    two_epochs: ReportData, tmp_path: Path
) -> None:
    titles = _panel_titles(two_epochs)
    assert not any("squared gradient" in t for t in titles)
    assert "Each layer's share of the epoch's importance" in titles
    varying = _data(write_outputs_trace(tmp_path / "lr.h5", epochs=2, lrs=[0.1, 0.01]))
    assert any("squared gradient" in t for t in _panel_titles(varying))


def test_last_epoch_correlation_is_marked_circular(two_epochs: ReportData) -> None:
    (fig,) = _pages(correlation.SECTION, two_epochs)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("L")]
    # The layer lines stop before the last epoch; it is drawn apart, hollow.
    assert lines
    assert all(max(line.get_xdata()) < 2 for line in lines)
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none"]
    assert hollow
    assert all(list(line.get_xdata()) == [2] for line in hollow)
    assert any("circular" in text.get_text() for text in ax.texts)


def test_where_each_decile_mattered_spans_zero_to_one(two_epochs: ReportData) -> None:
    (fig,) = _pages(deciles.SECTION, two_epochs)
    (ax,) = [a for a in fig.axes if a.get_title(loc="left") == "Where each decile mattered"]
    assert ax.get_ylim() == (0.0, 1.0)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_class_legend_covers_no_bar(two_epochs: ReportData) -> None:
    (fig,) = _pages(classes.SECTION, two_epochs)
    renderer = fig.canvas.get_renderer()
    ax = next(a for a in fig.axes if a.get_title(loc="left").startswith("Importance vs size"))
    legend = ax.get_legend().get_window_extent(renderer)
    for bar in ax.patches:
        assert not _overlaps(legend, bar.get_window_extent(renderer))


def test_seven_layers_with_long_names_are_not_clipped(tmp_path: Path) -> None:
    names = [f"encoder.blocks.{i}.attention.proj" for i in range(7)]
    data = _data(write_outputs_trace(tmp_path / "deep.h5", layer_names=names))
    for section in (deciles, classes, heatmaps, curves):
        for fig in _pages(section.SECTION, data):
            renderer = fig.canvas.get_renderer()
            width = fig.get_figwidth() * fig.dpi
            for ax in fig.axes:
                box = ax.get_tightbbox(renderer)
                assert box.x0 >= 0, (section.SECTION.id, ax.get_title(loc="left"))
                assert box.x1 <= width + 1, (section.SECTION.id, ax.get_title(loc="left"))


def test_class_names_label_tables_and_ticks(tmp_path: Path) -> None:
    data = _data(write_outputs_trace(tmp_path / "named.h5", class_names=["cat", "dog", "bird"]))
    assert data.class_name(1) == "dog"
    (fig,) = _pages(classes.SECTION, data)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["cat", "dog", "bird"]
    table_page = next(iter(candidates.SECTION.pages(data)))
    cells = {
        c.get_text().get_text()
        for ax in table_page.axes
        for t in ax.tables
        for c in t.get_celld().values()
    }
    assert {"cat", "dog", "bird"} & cells


def test_class_names_absent_fall_back_to_numbers(two_epochs: ReportData) -> None:
    assert two_epochs.class_names is None
    assert two_epochs.class_name(2) == "2"


def test_one_dimensional_thumbnail_is_a_line() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    draw_thumbnail(ax, np.linspace(0, 255, 28, dtype=np.uint8)[None, :])
    assert not [a for a in ax.get_children() if isinstance(a, AxesImage)]
    (line,) = [c for c in ax.get_children() if isinstance(c, Line2D) and len(c.get_xdata()) == 28]
    assert line.get_ydata()[-1] == 255
    square = fig.add_subplot(2, 1, 2)
    draw_thumbnail(square, np.zeros((8, 8), dtype=np.uint8))
    assert [a for a in square.get_children() if isinstance(a, AxesImage)]


def test_trajectories_of_top_candidates(two_epochs: ReportData) -> None:
    figures = _pages(candidates.SECTION, two_epochs)
    page = next(f for f in figures if "trajectories" in f._suptitle.get_text())
    loss_ax = page.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels[0].startswith("#7 ")  # the planted bad sample is the top candidate
    traj = two_epochs.trajectories([7])
    assert traj["epoch"].unique().sort().to_list() == [1, 2]
    assert traj.height == 2 * two_epochs.layers.height


def test_flag_and_alignment_pages_only_when_recorded(
    two_epochs: ReportData, tmp_path: Path
) -> None:
    _chosen, plan = plan_report(two_epochs, SECTIONS, None)
    left_out = {sid for sid, _title, _why in plan.omitted}
    assert {"flags", "alignment"} <= left_out
    full = _data(write_outputs_trace(tmp_path / "full.h5", flags=True, alignment=True, bad=(3, 7)))
    chosen, plan = plan_report(full, SECTIONS, None)
    assert {"flags", "alignment"} <= {s.id for s in chosen}
    quality = full.flag_quality("flipped")
    best = quality.row(0, named=True)
    assert best["k"] == 2
    assert best["average_precision"] == 1.0
    assert best["precision_at_k"] == best["recall_at_k"] == 1.0
    (fig,) = _pages(labelflags.SECTION, full)
    assert "flipped" in fig._suptitle.get_text()
    (fig,) = _pages(alignment.SECTION, full)
    assert fig.axes[0].get_lines()


def test_each_section_is_callable_from_python(two_epochs: ReportData, tmp_path: Path) -> None:
    from samplescope.reports import UnknownSectionError
    from samplescope.reports.figures import section_figure, section_figures

    fig = section_figure(two_epochs.trace, "heatmaps")
    assert isinstance(fig, Figure)
    assert "Importance by sample difficulty" in fig._suptitle.get_text()
    assert len(section_figures(two_epochs.trace, "candidates")) == 2  # no thumbnails here
    assert section_figures(two_epochs.trace, "alignment") == []  # not recorded
    with pytest.raises(UnknownSectionError):
        section_figure(two_epochs.trace, "nope")
    # From a path, the trace is opened and closed for the call.
    assert section_figure(two_epochs.path, "curves").axes


def test_trace_renders_in_jupyter(two_epochs: ReportData) -> None:
    page = two_epochs.trace._repr_html_()
    assert "samplescope trace" in page
    assert "<th>1</th><th>2</th>" in page  # epochs counted from 1
    for name in ("enc", "mid", "head"):
        assert name in page
    # Each epoch's column of shares sums to 100%.
    import re

    shares = [float(v) for v in re.findall(r"title='([0-9.]+)%'", page)]
    assert len(shares) == 3 * 2
    assert sum(shares[0::2]) == pytest.approx(100, abs=0.2)
