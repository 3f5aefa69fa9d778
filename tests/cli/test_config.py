"""Settings from [tool.sharpscope] or sharpscope.toml, and how the command line overrides them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_check import check, write
from tiny_cli import one_error_line

from sharpscope.cli.app import COMMANDS
from sharpscope.cli.config_file import find_config, load_config
from sharpscope.cli.config_file import read_config as read_with
from sharpscope.cli.declarations import COMMANDS as DECLARED
from sharpscope.cli.generate import keys
from sharpscope.errors import InputError

CHECK = COMMANDS["check"].load("check")
SETTINGS = keys(DECLARED["check"])


def read_config(path: Path):
    return read_with(path, SETTINGS)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty repository folder, the current folder, outside GitHub Actions."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    return tmp_path


@pytest.fixture
def saved(tiny_analysis: tuple[Path, dict[str, Any]], repo: Path) -> Path:
    return write(repo / "report.json", tiny_analysis[1])


def past(value: float) -> float:
    """A maximum below ``value`` by more than every margin: the solver's, the data's, the bias."""
    return value - (1 + 10 * abs(value))


def pyproject(folder: Path, table: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(f'[project]\nname = "x"\n\n[tool.sharpscope]\n{table}\n', encoding="utf-8")
    return path


def test_every_option_of_check_is_a_key_unless_declared_not():
    options = {p.name: p for p in CHECK.params if p.param_type_name == "option"}
    declarations = DECLARED["check"].declarations()
    not_in_file = {name for name, d in declarations.items() if not d.option.in_file}
    assert not_in_file == {
        *("config", "overrides", "json_out", "quiet", "debug", "update_baseline"),
        *("trust_pickle", "trust_code", "allow_different_data"),
    }
    assert {s.param for s in SETTINGS.values()} == set(options) - not_in_file - {"help"}
    for key, setting in SETTINGS.items():
        assert f"--{key}" in options[setting.param].opts
    assert SETTINGS["max-basis"].param == "max_basis"  # it had drifted: an option, not a key


def test_search_goes_up_to_the_repository_root(repo):
    sub = repo / "a" / "b"
    sub.mkdir(parents=True)
    assert find_config(sub) is None
    (repo / "a" / "pyproject.toml").write_text('[project]\nname = "x"\n')  # no table: skipped
    found = pyproject(repo, "seed = 3")
    assert find_config(sub) == found
    (repo / "a" / "sharpscope.toml").write_text("seed = 4\n")
    assert find_config(sub) == repo / "a" / "sharpscope.toml"
    assert load_config(SETTINGS, start=sub).options == {"seed": 4}


def test_search_stops_at_the_git_folder(repo):
    inner = repo / "inner"
    (inner / ".git").mkdir(parents=True)
    pyproject(repo, "seed = 3")
    assert find_config(inner) is None
    assert load_config(SETTINGS, start=inner).path is None


def test_sharpscope_toml_comes_before_pyproject(repo):
    pyproject(repo, "seed = 3")
    (repo / "sharpscope.toml").write_text("seed = 5\n")
    assert load_config(SETTINGS, start=repo).options == {"seed": 5}


def test_values_types_and_paths(repo):
    (repo / "ci").mkdir()
    (repo / "ci" / "val.npz").touch()
    path = repo / "ci" / "sharpscope.toml"
    path.write_text(
        'max-eigenvalue = 40\nmax-increase = "10%"\nmodel-arg = ["hidden=(16,)"]\ntrace = false\n'
        'baseline = "base.json"\ndata = "val.npz"\n'
    )
    options = read_config(path).options
    assert options["max_eigenvalue"] == 40 and options["max_increase"] == "10%"
    assert options["model_args"] == ["hidden=(16,)"] and options["trace"] is False
    assert options["baseline"] == str(repo / "ci" / "base.json")
    assert options["data"] == str(repo / "ci" / "val.npz")
    path.write_text('data = "digits"\n')
    assert read_config(path).options == {"data": "digits"}


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("max-eigenvale = 1", ["unknown key 'max-eigenvale'", "did you mean 'max-eigenvalue'"]),
        ('max-eigenvalue = "big"', ["'max-eigenvalue' must be a number", "a string"]),
        ("samples = 1.5", ["'samples' must be an integer", "a float"]),
        ("max-trace = true", ["'max-trace' must be a number", "a boolean"]),
        ('model-arg = "hidden=3"', ["'model-arg' must be an array of strings"]),
        ("trace = 1", ["'trace' must be true or false"]),
        ("max-trace = ", ["not valid TOML"]),
    ],
)
def test_config_errors_name_the_file_and_the_key(repo, table, words):
    path = pyproject(repo, table)
    with pytest.raises(InputError) as info:
        read_config(path)
    for word in [str(path), *words]:
        assert word in str(info.value)


def test_an_explicit_pyproject_needs_the_table(repo):
    path = repo / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n')
    with pytest.raises(InputError, match=r"no tool\.sharpscope table"):
        read_config(path)


def test_config_sets_defaults_and_the_command_line_wins(tiny_analysis, saved, repo):
    lam = tiny_analysis[1]["results"]["lambda_max"]
    pyproject(repo, f"max-eigenvalue = {past(lam)}")
    assert check(saved).exit_code == 1
    assert check(saved, "--max-eigenvalue", 2 * lam).exit_code == 0
    other = repo / "lenient.toml"
    other.write_text(f"max-eigenvalue = {2 * lam}\n")
    result = check(saved, "--config", other, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["config"] == str(other)


def test_config_is_found_from_a_subfolder(tiny_analysis, saved, repo, monkeypatch):
    pyproject(repo, f"max-eigenvalue = {past(tiny_analysis[1]['results']['lambda_max'])}")
    sub = repo / "src" / "pkg"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert check(saved).exit_code == 1


@pytest.mark.parametrize("explicit", [False, True])
def test_a_malformed_config_is_one_line_exit_2(saved, repo, explicit):
    path = pyproject(repo, 'max-eigenvalue = "lots"')
    result = check(saved, *(["--config", path] if explicit else []))
    one_error_line(result, str(path), "'max-eigenvalue'")


def test_a_missing_config_file_is_one_line_exit_2(saved, repo):
    one_error_line(check(saved, "--config", repo / "nope.toml"), "nope.toml")


def test_config_supplies_the_analysis_settings(tiny_analysis, repo):
    checkpoint, report = tiny_analysis  # analysed with the settings of tiny_cli.FAST
    toml = 'data = "digits"\nsamples = 64\ntop-k = 2\nmax-eigenvalue = 100\n'
    (repo / "sharpscope.toml").write_text(toml)
    result = check(checkpoint, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["figures"]
    assert figures["lambda_max"]["value"] == report["results"]["lambda_max"]
