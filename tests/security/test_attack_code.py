"""No code from a file: stored model specs, TorchScript, .pt2 archives and graphs, config files
found by search. Each attack is refused in one line naming the opt-in, runs nothing (no marker)
and changes no user file; the safe variant of each input still loads."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tiny_cli import FAST, make_checkpoint, refused
from torch import nn

from security.attack import Snapshot, cli, run_sharpscope
from sharpscope.cli.config_file import find_config
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import SPEC_KEY, load_model, read_checkpoint
from sharpscope.io.models import ModelSpec, build_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PRECIOUS = b"precious data of the user\n"
NET = "from sharpscope.io.architectures import mlp\n\ndef make():\n    return mlp(hidden=(16,))\n"
"""A user's model factory: the same network as test_check's tiny checkpoint."""


@pytest.fixture
def user(tmp_path: Path) -> Path:
    """A folder of the user's: a file an attack would overwrite, and the inputs."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(PRECIOUS)
    return folder


def _digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("mlp", {"hidden": (16,)})).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# --- 1. a model spec stored in a checkpoint names code -------------------------------------------


def _payload(marker: Path) -> str:
    return json.dumps({"target": "subprocess:getoutput", "args": {"cmd": f"touch {marker}"}})


def _stored_spec_file(folder: Path, container: str, spec: str) -> Path:
    """Weights of the digits MLP with ``spec`` stored as sharpscope stores its own."""
    state = _state(_digits_mlp())
    if container == "safetensors":
        path = folder / "model.safetensors"
        save_file(state, str(path), metadata={SPEC_KEY: spec})
    else:
        path = folder / "model.pt"
        torch.save({"state_dict": state, SPEC_KEY: spec}, path)
    return path


COMMANDS: dict[str, list[str]] = {
    "analyze": ["analyze", "--out", "{out}"],
    "check": ["check", "--max-eigenvalue", "1e9"],
    "landscape": ["landscape", "--points", "3", "--out", "{out}"],
    "finetune": ["finetune", "--steps", "1", "--out", "{out}"],
}
"""Each command that loads a model; ``{out}`` is a folder outside the user's."""


def command(name: str, out: Path) -> list[str]:
    return [str(out) if arg == "{out}" else arg for arg in COMMANDS[name]]


@pytest.mark.parametrize("container", ["safetensors", "torch.save"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_stored_spec_that_names_code_is_refused(tmp_path, user, marker, container, name):
    path = _stored_spec_file(user, container, _payload(marker))
    snap = Snapshot(user)
    result = cli(*command(name, tmp_path / "out"), path, "--data", "digits")
    refused(result.exit_code, result.stderr, path.name, "subprocess:getoutput", "--model")
    refused(result.exit_code, result.stderr, "--trust-code")
    snap.assert_unchanged()


def test_the_library_refuses_a_stored_spec_before_importing_it(user, marker):
    path = _stored_spec_file(user, "safetensors", _payload(marker))
    with pytest.raises(InputError, match=r"`model`.*`trust_code`"):
        load_model(path)
    assert read_checkpoint(path).model_spec == ModelSpec.from_json(_payload(marker))


def test_stored_specs_of_builtins_load_and_code_needs_the_users_word(user, monkeypatch):
    """sharpscope's own spec needs nothing; a spec naming code loads when the user gives it with
    --model, or trusts the file."""
    builtin = make_checkpoint(user)
    assert cli("analyze", builtin, *FAST).exit_code == 0
    (user / "net.py").write_text(NET, encoding="utf-8")
    monkeypatch.chdir(user)
    coded = _stored_spec_file(user, "safetensors", json.dumps({"target": "net.py:make"}))
    snap = Snapshot(user)
    result = cli("analyze", coded, *FAST)
    refused(result.exit_code, result.stderr, "'net.py:make'", "--model", "--trust-code")
    assert cli("analyze", coded, *FAST, "--model", "net.py:make").exit_code == 0
    assert cli("analyze", coded, *FAST, "--trust-code").exit_code == 0
    snap.assert_unchanged()


def test_a_resumed_run_runs_no_code_from_its_folder(tmp_path, user, monkeypatch):
    """A run folder is a file too: the model spec its checkpoints store and the data function
    its config.json names run only when given again or with --trust-code."""
    (user / "net.py").write_text(NET, encoding="utf-8")
    (user / "rows.py").write_text(
        "import torch\n\ndef make():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(32, 64, generator=g), torch.arange(32) % 10\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(user)
    run = tmp_path / "run"
    start = ["finetune", make_checkpoint(user), "--model", "net.py:make", "--out", run]
    assert cli(*start, "--data", "digits", "--steps", "1", "--quiet").exit_code == 0
    snap = Snapshot(user)
    result = cli("finetune", "--resume", run, "--steps", "2", "--quiet")
    refused(result.exit_code, result.stderr, "net.py:make", "--model", "--trust-code")
    again = ["finetune", "--resume", run, "--quiet"]
    assert cli(*again, "--steps", "2", "--model", "net.py:make").exit_code == 0
    assert cli(*again, "--steps", "3", "--trust-code").exit_code == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": "rows.py:make"}))
    result = cli(*again, "--steps", "4", "--model", "net.py:make")
    refused(result.exit_code, result.stderr, "config.json", "--data rows.py:make", "--trust-code")
    snap.assert_unchanged()


# --- 2. a .pt2 whose zip holds an entry twice ----------------------------------------------------


def _exported(path: Path) -> Path:
    """The digits MLP as torch.export.save writes it (any batch size)."""
    batch = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(_digits_mlp(), (torch.randn(64, 1, 8, 8),), dynamic_shapes=batch)
    torch.export.save(program, path)
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


# Entry order that makes torch 2.13's zip reader take the pickling weights config and the
# pickled weight_0 while Python's zipfile (the old guard) takes the benign config: None marks
# the second, benign copy of the config, at the end.
_DUPLICATE_ORDER = [
    ("weight_0", "evil"),
    ("model_constants_config.json", "plain"),
    ("model_weights_config.json", "evil"),
    ("version", "plain"),
    ("weight_1", "plain"),
    ("model.json", "plain"),
    ("archive_version", "plain"),
    ("weight_0", "plain"),
    ("byteorder", "plain"),
    ("archive_format", "plain"),
    ("model.pt", "plain"),
    ("serialization_id", "plain"),
    ("model_weights_config.json", "plain"),
]


def _duplicated(source: Path, path: Path, marker: Path) -> Path:
    """``source`` with a second weights config saying ``use_pickle`` and a second ``weight_0``
    that pickles ``os.system``."""
    with zipfile.ZipFile(source) as archive:
        entries = {n.rsplit("/", 1)[-1]: (n, archive.read(n)) for n in archive.namelist()}
    config = json.loads(entries["model_weights_config.json"][1])
    for payload in config["config"].values():
        payload["use_pickle"] = True
    evil = {
        "weight_0": pickle.dumps(_Payload(marker)),
        "model_weights_config.json": json.dumps(config).encode(),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for tail, kind in _DUPLICATE_ORDER:
            name, data = entries[tail]
            archive.writestr(zipfile.ZipInfo(name), evil[tail] if kind == "evil" else data)
    return path


def test_duplicate_entries_are_a_real_attack(tmp_path):
    """What torch 2.13 loads from such a file runs the payload, unseen by Python's zipfile."""
    proof = tmp_path / "proof-marker"
    path = _duplicated(_exported(tmp_path / "plain.pt2"), tmp_path / "twice.pt2", proof)
    with pytest.raises(Exception):  # noqa: B017 (os.system returns an int, not a tensor)
        torch.export.load(path)
    assert proof.exists()


def test_a_pt2_with_duplicate_entries_is_refused(tmp_path, user, marker):
    plain = _exported(user / "plain.pt2")
    path = _duplicated(plain, user / "twice.pt2", marker)
    with zipfile.ZipFile(path) as archive:  # what the old guard read: the benign copy
        name = next(n for n in archive.namelist() if n.endswith("weights_config.json"))
        assert b'"use_pickle": true' not in archive.read(name)
    snap = Snapshot(user)
    result = cli("analyze", path, *FAST)
    refused(result.exit_code, result.stderr, "twice.pt2", "more than once", "weight_0")
    result = cli("analyze", path, *FAST, "--trust-code", "--trust-pickle")  # never readable
    refused(result.exit_code, result.stderr, "more than once")
    assert cli("analyze", plain, *FAST).exit_code == 0  # an ordinary .pt2 needs no flag
    snap.assert_unchanged()


# --- 3. TorchScript writes files as it loads -----------------------------------------------------


class _Writer(nn.Module):
    """Overwrites the start of ``path`` through a shared file mapping when unpickled."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.size = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, bool]:
        return (self.path, self.size, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, bool]) -> None:
        self.path, self.size, self.training = state
        mapped = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        mapped.fill_(88)
        self.size = int(mapped[0])


class _Scripted(nn.Module):
    def __init__(self, victim: Path) -> None:
        super().__init__()
        self.writer = _Writer(str(victim))
        self.net = _digits_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.writer(x))


def test_torchscript_needs_trust_code(tmp_path, user):
    scratch = tmp_path / "scratch.txt"
    scratch.write_bytes(PRECIOUS)
    path = user / "scripted.pt"
    torch.jit.save(torch.jit.script(_Scripted(user / "notes.txt").eval()), path)
    torch.jit.save(torch.jit.script(_Scripted(scratch).eval()), tmp_path / "proof.pt")
    torch.jit.load(str(tmp_path / "proof.pt"))  # the attack is real: loading it writes
    assert scratch.read_bytes() != PRECIOUS
    snap = Snapshot(user)
    for name in COMMANDS:
        result = cli(*command(name, tmp_path / "out"), path, "--data", "digits")
        refused(result.exit_code, result.stderr, "TorchScript", "runs when it is loaded")
        refused(result.exit_code, result.stderr, "write files", "--trust-code")
    snap.assert_unchanged()
    with pytest.raises(InputError, match="`trust_code`"):
        read_checkpoint(path)


@pytest.mark.integration
def test_trusted_torchscript_loads_without_warnings(tmp_path, no_network):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_digits_mlp()), path)
    always = {"PYTHONWARNINGS": "always"}  # torch.jit.load's DeprecationWarning would show
    done = run_sharpscope("analyze", path, *FAST, "--trust-code", guard=no_network, **always)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


# --- 4. a .pt2 graph that writes a file ----------------------------------------------------------


def _with_file_write(program: torch.export.ExportedProgram, graph: torch.fx.Graph, victim: Path):
    """Insert ``aten.from_file(victim, shared=True)`` and ``fill_`` before ``graph``'s output."""
    output = next(n for n in graph.nodes if n.op == "output")
    fake = next(
        n.meta["val"].fake_mode
        for n in program.graph.nodes
        if n.op == "placeholder" and hasattr(n.meta.get("val"), "fake_mode")
    )
    with graph.inserting_before(output):
        mapped = graph.call_function(
            torch.ops.aten.from_file.default, (str(victim), True, 4), {"dtype": torch.uint8}
        )
        filled = graph.call_function(torch.ops.aten.fill_.Scalar, (mapped, 88))
    with fake:
        mapped.meta["val"] = filled.meta["val"] = torch.empty(4, dtype=torch.uint8)


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _digits_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.cond(y.sum() > -1e9, lambda t: t + 0, lambda t: t - 0, (y,))


def _file_writing_pt2(path: Path, victim: Path, in_branch: bool) -> Path:
    """A digits MLP exported and saved with a file write in its graph or in a cond branch."""
    model = _Branches().eval() if in_branch else _digits_mlp()
    program = torch.export.export(model, (torch.randn(64, 1, 8, 8),))
    graph = program.graph_module.true_graph_0.graph if in_branch else program.graph
    _with_file_write(program, graph, victim)
    torch.export.save(program, path)
    return path


def test_a_pt2_graph_that_writes_a_file_is_a_real_attack(tmp_path):
    scratch = tmp_path / "scratch.txt"
    scratch.write_bytes(PRECIOUS)
    path = _file_writing_pt2(tmp_path / "proof.pt2", scratch, in_branch=False)
    torch.export.load(path).module()(torch.randn(64, 1, 8, 8))
    assert scratch.read_bytes() != PRECIOUS


@pytest.mark.parametrize("in_branch", [False, True])
def test_a_pt2_graph_that_writes_a_file_needs_trust_code(user, in_branch):
    path = _file_writing_pt2(user / "writes.pt2", user / "notes.txt", in_branch)
    snap = Snapshot(user)
    result = cli("analyze", path, *FAST)
    refused(result.exit_code, result.stderr, "writes.pt2", "aten.from_file", "--trust-code")
    snap.assert_unchanged()


@pytest.mark.integration
def test_a_pt2_that_torch_cannot_read_is_one_error_line(tmp_path, no_network):
    """torch logs a traceback before it raises: only the error line reaches the terminal."""
    plain = _exported(tmp_path / "plain.pt2")
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(plain) as old, zipfile.ZipFile(broken, "w") as new:
        for name in old.namelist():  # a weight too short for its shape
            data = b"1234" if name.endswith("weights/weight_0") else old.read(name)
            new.writestr(zipfile.ZipInfo(name), data)
    done = run_sharpscope("analyze", broken, *FAST, guard=no_network)
    refused(done.returncode, done.stderr, "broken.pt2", "torch.export.load cannot read")
    assert "warnings above" not in done.stderr  # torch's vague error: the logged cause instead


# --- 5. a config file found by search names code -------------------------------------------------

EVIL_DATA = "import pathlib\n\ndef make():\n    pathlib.Path({marker!r}).touch()\n"


def _shared_parent(tmp_path: Path, marker: Path) -> tuple[Path, Path]:
    """A shared folder (like the system's temporary one) holding a sharpscope.toml that names a
    data function beside it, and a project of another user's below it."""
    shared = tmp_path / "shared"
    project = shared / "victim" / "project"
    project.mkdir(parents=True)
    (shared / "evil.py").write_text(EVIL_DATA.format(marker=str(marker)), encoding="utf-8")
    (shared / "sharpscope.toml").write_text(f'data = "{shared}/evil.py:make"\n', encoding="utf-8")
    return shared, project


def test_the_config_search_stops_at_home_and_in_shared_folders(tmp_path, marker, monkeypatch):
    shared, project = _shared_parent(tmp_path, marker)
    checkpoint = make_checkpoint(project)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    snap = Snapshot(shared)
    assert find_config(project) is None  # neither under home nor in a repository
    result = cli("check", checkpoint, "--max-eigenvalue", "1e9", "--quiet")
    refused(result.exit_code, result.stderr, "--data")  # the shared file was not read
    monkeypatch.setenv("HOME", str(shared / "victim"))  # home below the shared folder
    assert find_config(project) is None
    snap.assert_unchanged()


def test_code_from_a_config_found_by_search_needs_the_users_word(tmp_path, marker, monkeypatch):
    shared, project = _shared_parent(tmp_path, marker)
    (shared / ".git").mkdir()  # the shared folder is a repository root: the search reaches it
    checkpoint = make_checkpoint(project)
    monkeypatch.chdir(project)
    assert find_config(project) == shared / "sharpscope.toml"
    snap = Snapshot(shared)
    result = cli("check", checkpoint, "--max-eigenvalue", "1e9", "--quiet")
    refused(result.exit_code, result.stderr, "sharpscope.toml", "data = ", "evil.py:make")
    refused(result.exit_code, result.stderr, "--config", "--trust-code")
    snap.assert_unchanged()
    benign = project / "rows.py"
    benign.write_text(
        "import torch\n\ndef make():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(32, 64, generator=g), torch.arange(32) % 10\n",
        encoding="utf-8",
    )
    (shared / "sharpscope.toml").write_text(f'data = "{benign}:make"\n', encoding="utf-8")
    gate = ["check", checkpoint, "--max-eigenvalue", "1e9", "--samples", "32", "--top-k", "1"]
    assert cli(*gate, "--quiet", "--config", shared / "sharpscope.toml").exit_code == 0
    assert cli(*gate, "--quiet", "--trust-code").exit_code == 0
    assert cli(*gate, "--quiet", "--data", f"{benign}:make").exit_code == 0  # the user's own


# --- a save_pretrained folder names its class --------------------------------------------------


@pytest.mark.parametrize("name", [42, "__class__", "utils", "AutoModel", "os.system", "pipeline"])
def test_a_folder_s_architectures_can_name_only_transformers_model_classes(tmp_path, name):
    """The class is looked up among transformers' public names and must be a PreTrainedModel:
    a function, module, Auto class or non-name is refused before anything is called."""
    pytest.importorskip("transformers")
    from tiny_hf import bert

    folder = tmp_path / "bert"
    bert().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
    snap = Snapshot(folder)
    with pytest.raises(InputError, match="does not define"):
        load_model(folder)
    snap.assert_unchanged()


# --- 6. a PEFT adapter config names a module to import -------------------------------------------


def _megatron_adapter(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A LoRA adapter whose config asks peft to import ``megatron_core``: a module on the path
    that creates ``marker`` when imported."""
    pytest.importorskip("peft")
    import tiny_peft

    (tmp_path / "planted_megatron.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(
        megatron_config={"tensor_model_parallel_size": 1}, megatron_core="planted_megatron"
    )
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_an_adapter_config_naming_a_module_is_refused(tmp_path, user, marker, monkeypatch):
    """peft imports the module ``megatron_core`` names (0.22 checks it against an allowlist,
    older releases need not): sharpscope refuses the setting whatever peft is installed."""
    adapter = _megatron_adapter(tmp_path, marker, monkeypatch)
    tokens = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.zeros(4, 5, dtype=torch.long)}, str(tokens))
    snap = Snapshot(user, adapter)
    result = cli("analyze", adapter, "--data", tokens, "--quiet")
    refused(result.exit_code, result.stderr, "megatron", "plain LoRA")
    snap.assert_unchanged()
