"""The public API that ``import sharpscope`` exports, and the start-up it allows: the package and
the command's ``--help``/``--version`` import no torch until a name or a command needs it."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharpscope as ss
from sharpscope import version
from sharpscope.curvature import Objective
from sharpscope.errors import InputError

NO_TORCH = """
import sys
{body}
print("torch" in sys.modules)
"""


def _imports_torch(body: str) -> bool:
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(body=body)],
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.integration
@pytest.mark.parametrize("argv", [["--version"], ["--help"], []])
def test_the_command_starts_without_torch(argv):
    body = (
        "from sharpscope.cli.app import main\n"
        f"sys.argv = ['sharpscope', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert not _imports_torch(body)


@pytest.mark.integration
def test_the_package_loads_its_names_on_first_use():
    assert not _imports_torch("import sharpscope")
    assert _imports_torch("import sharpscope\nsharpscope.lanczos")


def test_every_exported_name_resolves():
    for name in ss.__all__:
        assert getattr(ss, name) is not None, name
    assert set(ss.__all__) <= set(dir(ss))
    with pytest.raises(AttributeError, match="no attribute 'lanczoz'"):
        _ = ss.lanczoz


def test_the_version_has_one_source():
    """pyproject.toml reads sharpscope/version.py (the installed metadata says the same), and the
    package root re-exports it."""
    assert importlib.metadata.version("sharpscope") == version.__version__ == ss.__version__


def test_no_module_imports_a_name_from_the_lazy_package_root():
    """Inside the package, ``from sharpscope import X`` imports only submodules: a name of the
    lazy root (as ``__version__`` once was) would be an upward import."""
    root = Path(ss.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "sharpscope" and not node.level:
                for name in (alias.name for alias in node.names):
                    submodule = (root / f"{name}.py").is_file() or (root / name).is_dir()
                    assert submodule, f"{path.relative_to(root)} imports {name} from the root"


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hessian_eigs_by_each_solver_matches_the_dense_hessian(mlp, method):
    exact = torch.linalg.eigvalsh(mlp.hessian)
    settings = ss.SolveSettings(tol=1e-10, max_iter=300)
    objective = ss.Objective(mlp.model, mlp.loss_fn, mlp.batches)
    top = ss.hessian_eigs(objective, k=3, method=method, settings=settings)
    bottom = ss.hessian_eigs(objective, k=1, which="smallest")
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-7, atol=0)
    torch.testing.assert_close(bottom.eigenvalues, exact[:1], rtol=1e-6, atol=0)


def test_an_unknown_solver_names_the_parameter(mlp):
    with pytest.raises(InputError, match="unknown `method` 'qr'; choose one of lanczos, power"):
        ss.hessian_eigs(ss.Objective(mlp.model, mlp.loss_fn, mlp.batches), method="qr")


def test_hessian_trace_and_density_agree_with_the_dense_hessian(mlp):
    exact = float(torch.trace(mlp.hessian))
    objective = ss.Objective(mlp.model, mlp.loss_fn, mlp.batches)
    trace = ss.hessian_trace(objective, settings=ss.SolveSettings(tol=1e-3, max_iter=200))
    assert abs(trace.estimate - exact) <= 3 * trace.std_error
    density = ss.spectral_density(objective, n_vectors=2, n_iter=30)
    eigenvalues = torch.linalg.eigvalsh(mlp.hessian)
    for nodes in density.nodes:
        assert nodes.min() >= eigenvalues[0] - 1e-8 and nodes.max() <= eigenvalues[-1] + 1e-8


def test_sam_alignment_is_the_cosine_with_the_dense_top_eigenvector(mlp):
    op = ss.HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    vectors = torch.linalg.eigh(mlp.hessian).eigenvectors.flip(1)[:, :2].T.contiguous()
    result = ss.sam_alignment(op, vectors, rho=0.05, alpha=0.2)
    g = op.gradient()
    assert result.cos_full == pytest.approx(abs(float(g @ vectors[0])) / float(g.norm()), rel=1e-9)
