"""The builder's generics let a type checker follow ``prev`` from step to step.

Runs mypy (strict) on a correct workflow, which must pass, and on workflows
that misuse ``prev``, which must fail with the error that names the misuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

CASES = Path(__file__).parent / "typing_cases"


def _mypy(name: str) -> tuple[str, int]:
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--show-error-codes", str(CASES / name)]
    )
    return stdout + stderr, status


@pytest.mark.slow
def test_correct_chain_type_checks() -> None:
    out, status = _mypy("good.py")
    assert status == 0, out
    assert 'Revealed type is "reflow_core.workflow.Workflow[good.Order, None]"' in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad.py", 'Argument 2 to "step" of "Workflow" has incompatible type'),
        ("bad_prev_attr.py", '"int" has no attribute "upper"'),
        # prev after a conditional step is its output or its input, not only its output.
        ("bad_conditional.py", 'Argument 2 to "step" of "Workflow" has incompatible type'),
    ],
)
def test_misused_prev_is_rejected(case: str, expected: str) -> None:
    out, status = _mypy(case)
    assert status == 1, out
    assert expected in out, out


@pytest.mark.slow
def test_prev_after_a_conditional_step_is_its_output_or_its_input() -> None:
    out, status = _mypy("conditional.py")
    assert status == 0, out
    # A plain and an async predicate both widen prev to the union.
    revealed = 'Revealed type is "reflow_core.workflow.Workflow[conditional.Order, str | int]"'
    assert out.count(revealed) == 2, out


@pytest.mark.slow
def test_a_wait_that_continues_on_timeout_adds_the_marker_to_prev() -> None:
    out, status = _mypy("wait_timeout.py")
    assert status == 0, out
    workflow_type = "reflow_core.workflow.Workflow[Any, wait_timeout.Approval{}]"
    assert f'Revealed type is "{workflow_type.format("")}"' in out, out
    marker = " | reflow_core.codec.WaitTimedOut"
    assert f'Revealed type is "{workflow_type.format(marker)}"' in out, out


@pytest.mark.slow
def test_a_map_gives_the_next_step_the_list_of_results() -> None:
    out, status = _mypy("mapped.py")
    assert status == 0, out
    revealed = 'Revealed type is "reflow_core.workflow.Workflow[dict[str, list[str]], list[int]]"'
    assert revealed in out, out


@pytest.mark.slow
def test_the_blocking_client_keeps_the_engines_signatures() -> None:
    out, status = _mypy("sync_client.py")
    assert status == 1, out
    views = "reflow_core.engine.views"
    for revealed in (
        f"{views}.Run",
        f"list[{views}.Run]",
        f"list[{views}.Run | reflow_core.errors.IdempotencyConflictError]",
        f"tuple[list[{views}.Run], list[str], fallback={views}.WaitedRuns]",
        f"{views}.Run | None",
    ):
        assert f'Revealed type is "{revealed}"' in out, out
    # A wrong argument is caught as it would be on the engine.
    assert 'Argument "priority" has incompatible type "str"; expected "int | None"' in out, out
    assert out.count("error:") == 1, out
