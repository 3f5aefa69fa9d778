"""The public API's docstrings: each public function and class of ``sharpscope`` and
``sharpscope.curvature`` says its arguments (``Args:``, or ``Attributes:`` for a record), what a
function returns (``Returns:``), and gives one example, which runs here as a doctest in its
module's namespace (as ``python -m doctest`` runs it), with its methods' examples."""

from __future__ import annotations

import doctest
import inspect

import pytest

import sharpscope
import sharpscope.curvature

EXEMPT = {
    "AnalyzeConfig": "its fields are declared, each with its help, in analysis/config.py",
}
"""Public names whose documentation lives elsewhere, and where."""


def _public() -> dict[str, object]:
    """Every public function and class by name (constants and type aliases aside)."""
    names = {*sharpscope.__all__, *sharpscope.curvature.__all__} - {"__version__"}
    found = {}
    for name in sorted(names):
        value = getattr(sharpscope.curvature, name, None) or getattr(sharpscope, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            found[name] = value
    return found


PUBLIC = _public()


def _takes_arguments(value: object) -> bool:
    target = value.__init__ if inspect.isclass(value) else value  # type: ignore[misc]
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return False
    return bool([p for p in parameters if p != "self"])


def test_the_public_api_is_all_here():
    """The operators, the estimators, the objective and its factory, the optimizers."""
    for name in ("Objective", "curvature_operator", "HessianOperator", "lanczos", "SAM", "slq"):
        assert name in PUBLIC


@pytest.mark.parametrize("name", sorted(set(PUBLIC) - set(EXEMPT)))
def test_public_names_document_their_arguments_result_and_an_example(name: str):
    value = PUBLIC[name]
    doc = inspect.getdoc(value) or ""
    missing = []
    if _takes_arguments(value) and "Args:" not in doc and "Attributes:" not in doc:
        missing.append("Args:")
    if inspect.isfunction(value) and "Returns:" not in doc and "Yields:" not in doc:
        missing.append("Returns:")
    if "Examples:" not in doc or ">>> " not in doc:
        missing.append("an Examples: doctest")
    assert not missing, f"{name}'s docstring lacks {', '.join(missing)}"


@pytest.mark.parametrize("name", sorted(set(PUBLIC) - set(EXEMPT)))
def test_every_example_runs(name: str):
    value = PUBLIC[name]
    module = inspect.getmodule(value)
    tests = doctest.DocTestFinder().find(value, name, module=module, globs=vars(module))
    examples = [t for t in tests if t.examples]  # the class's or function's, and its methods'
    assert examples, f"{name} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}'s example failed (see the output above)"
