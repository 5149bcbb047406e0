"""How the CLI reports failures: user errors as one line, bugs with their traceback, `--debug` for both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finesteer.models
from finesteer.cli import app
from finesteer.cli.common import error_line, is_user_error
from finesteer.cli.options import OptionError, parse_numbers, slug
from finesteer.errors import FinesteerError


def _fail_loading(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def load_model(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(finesteer.models, "load_model", load_model)


def test_a_finesteer_error_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_loading(monkeypatch, FinesteerError("no model called 'nope'\nchoose from the registry"))
    result = CliRunner().invoke(app, ["info", "nope"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: no model called 'nope'; choose from the registry"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "bug", [RuntimeError("CUDA out of memory"), KeyError("layer"), TypeError("x"), ValueError("bad shape")]
)
def test_a_bug_propagates_with_its_traceback(monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    _fail_loading(monkeypatch, bug)
    result = CliRunner().invoke(app, ["info", "tiny-llama"])
    assert result.exit_code == 1 and result.exception is bug  # not swallowed into "error: …"
    assert "error:" not in result.output
    assert result.exc_info is not None and result.exc_info[2] is not None


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_loading(monkeypatch, FinesteerError("bad input"))
    result = CliRunner().invoke(app, ["--debug", "info", "nope"])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output
    assert "FinesteerError: bad input" in result.output
    assert result.output.rstrip().splitlines()[-1] == "error: bad input"


def test_file_errors_are_user_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(app, ["locate", "overlap", str(missing), str(missing)])
    assert result.exit_code == 2 and str(missing) in result.output
    assert is_user_error(FileNotFoundError("x")) and is_user_error(IsADirectoryError("x"))
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))
    import yaml

    assert is_user_error(yaml.YAMLError("bad indentation"))
    assert is_user_error(json.JSONDecodeError("x", "", 0))


def test_a_bad_option_value_is_one_line() -> None:
    args = ["ablate", "tiny-llama", "--data", "advbench", "--heads", "0.0", "--ks", "1,x"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == "error: cannot parse --ks '1,x': write integers separated by commas"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["locate", "ships", "tiny-llama", "--data", "advbench", "--mode", "xx"], "unknown Ships mode 'xx'"),
        (["eval", "ab", "tiny-llama", "--data", "coordinate-other-ais", "--limit", "-1"], "limit must be"),
        (["compare", "tiny-llama", "--methods", " , "], "--methods is empty"),
        (["compare", "tiny-llama", "--settings", "[1]"], "--settings must map each method name"),
    ],
)
def test_library_input_errors_are_one_line(args: list[str], message: str) -> None:
    """Bad input the library rejects (a FinesteerError subclass, not a plain ValueError) is one line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output


def test_option_helpers() -> None:
    assert parse_numbers("2, 4,8", "--alphas") == (2.0, 4.0, 8.0)
    assert parse_numbers("-2,-4", "--alphas") == (-2.0, -4.0)
    assert parse_numbers(None, "--alphas") is None
    assert parse_numbers("1,2", "--ks", int) == (1, 2)
    with pytest.raises(OptionError, match="--alphas is empty"):
        parse_numbers(" , ", "--alphas")
    with pytest.raises(FinesteerError, match="write integers"):
        parse_numbers("1.5", "--ks", int)
    assert slug("ships", "org/model-x", "", "ua") == "ships-model_x-ua"
    assert slug("a b/c") == "c" and slug("a b") == "a_b"
    assert error_line(ValueError("one\n  two\n")) == "one; two"
