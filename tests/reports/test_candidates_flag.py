"""The report's mislabeled candidates are `samplescope flag`'s, in the same order."""

from __future__ import annotations

from samplescope.analysis.flags import flag
from samplescope.experiments.demo import DemoResult
from samplescope.reports._data import ReportData
from samplescope.reports.candidates import candidate_tables


def test_report_candidates_match_flag(demo: DemoResult) -> None:
    from samplescope.analysis import open_trace

    with open_trace(demo.trace) as trace:
        mislabeled, _ = candidate_tables(ReportData(trace), top=10)
        flagged = flag(trace, kind="mislabeled", budget=10)
    assert mislabeled["sample_id"].to_list() == flagged["sample_id"].head(10).to_list()
    assert mislabeled["score"].to_list() == (1 - flagged["label_quality"].head(10)).to_list()
