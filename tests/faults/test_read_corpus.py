"""The read side of the fault matrix (tests/faults/corpus.py): every corrupted or crafted
trace gives a result or a one-line exit-2 error from info, sql, samples and report; never a
hang, a traceback, a crash, or a read outside the file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import Case, Outcome, make_corpus, run_matrix, summary

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults-read")]

# Mutations that break a documented invariant or reach outside the file: `info` must refuse.
REFUSED = {
    "mut-outside-external-storage",
    "mut-outside-external-strings",
    "mut-outside-fifo",
    "mut-outside-external-link",
    "mut-outside-soft-link",
    "mut-outside-virtual",
    "mut-huge-rows",
    "mut-huge-chunk",
    "mut-huge-contiguous",
    "mut-unequal-layers",
    "mut-unequal-visits",
    "mut-batch-size",
    "mut-negative-offset",
    "mut-steps-repeat",
    "mut-duplicate-ids",
    "mut-duplicate-layer",
    "mut-grad-width",
    "mut-missing-column",
    "mut-newer-version",
    "mut-wrong-types",
}
# Odd but legal: read, with every command succeeding.
READ = {"base-closed", "base-crashed", "mut-dollar-names", "mut-bad-json", "mut-inf-hparams"}


def _report_for(case: Case) -> bool:
    # A report takes seconds; flips and cuts that open at all are covered by samples/sql.
    return case.name.startswith(("mut-", "base-"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[Outcome]:
    folder = tmp_path_factory.mktemp("fault-corpus")
    cases = make_corpus(folder, flips=24, cuts=6)
    results = run_matrix(cases, folder, report_for=_report_for)
    print(summary(results))
    return results


def test_every_outcome_is_a_result_or_one_error_line(outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if o.status not in ("ok", "error")]
    assert not bad, "\n".join(f"{o.case} {o.command}: {o.status} {o.detail[:300]}" for o in bad)


def test_no_command_takes_long(outcomes: list[Outcome]) -> None:
    # Under 30 s even on a loaded machine; HDF5's SWMR retries used to hang for hours.
    assert max(o.seconds for o in outcomes) < 30


def test_crafted_traces_are_refused(outcomes: list[Outcome]) -> None:
    info = {o.case: o for o in outcomes if o.command == "info"}
    assert info.keys() >= REFUSED
    accepted = {name: info[name].status for name in REFUSED if info[name].status != "error"}
    assert not accepted


def test_odd_but_legal_traces_are_read(outcomes: list[Outcome]) -> None:
    failed = [
        (o.case, o.command, o.detail) for o in outcomes if o.case in READ and o.status != "ok"
    ]
    assert not failed


def test_the_corpus_has_flips_and_cuts(outcomes: list[Outcome]) -> None:
    names = {o.case for o in outcomes}
    assert sum(n.startswith("flip-") for n in names) == 36
    assert sum(n.startswith("cut-") for n in names) == 12
