"""The CLI's numbers are those recorded before the refactor (tests/golden/*.json).

Every case runs `finesteer … --json` in-process (tests/golden/make_golden.py lists them) and is compared
with its stored output: ints, strings, rankings and key sets exactly, floats within 1e-6 (relative or
absolute; see `REL_TOL` there), keys added since are fine. Regenerate only on purpose:
`PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 python -m tests.golden.make_golden`.
"""

from __future__ import annotations

import pytest

from tests.golden.make_golden import CASES, GOLDEN_DIR, Case, Session, differences, golden_path, load_golden


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return Session(tmp_path_factory.mktemp("golden"))


def _param(case: Case) -> object:
    return pytest.param(case.name, id=case.name, marks=[pytest.mark.real_model] if case.real else [])


@pytest.mark.parametrize("name", [_param(case) for case in CASES])
def test_cli_output_matches_golden(name: str, session: Session) -> None:
    assert golden_path(name).is_file(), f"no golden file for {name}: run tests/golden/make_golden.py"
    problems = differences(load_golden(name), session.output(name))
    assert not problems, f"{name} departs from its golden output:\n" + "\n".join(problems[:40])


def test_comparison_rules() -> None:
    golden = {"rate": 0.5, "n": 3, "heads": ["1.2", "0.3"], "nested": {"p": [0.25, None, True]}}
    assert differences(golden, {**golden, "new_key": 1}) == []  # additions are fine
    assert differences(golden, {**golden, "rate": 0.5 + 5e-7}) == []  # last-bit noise is fine
    assert differences({"norm": 23.597341537475586}, {"norm": 23.59735}) == []  # relative, float32
    assert differences(golden, {**golden, "rate": 0.5 + 1e-5}) != []
    assert differences(golden, {**golden, "n": 4}) != []
    assert differences(golden, {**golden, "heads": ["0.3", "1.2"]}) != []  # ranking order matters
    assert differences(golden, {k: v for k, v in golden.items() if k != "n"}) == ["$.n: missing"]
    assert differences(golden, {**golden, "nested": {"p": [0.25, None, False]}}) != []
    assert differences(golden, {**golden, "nested": {"p": [0.25, None]}}) != []


def test_every_golden_file_has_a_case() -> None:
    names = {case.name for case in CASES}
    stored = {path.stem for path in GOLDEN_DIR.glob("*.json")}
    assert stored == names
