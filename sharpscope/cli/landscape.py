"""``sharpscope landscape``: the loss on a line and a grid around a checkpoint's weights, as a PNG
and as JSON (torch and matplotlib are imported when it runs, not for its help)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from sharpscope.analysis.landscape_config import LandscapeConfig
from sharpscope.cli.common import ProgressBars, command_scope, info, set_threads
from sharpscope.cli.generate import Checkpoint, Values, declared_command
from sharpscope.errors import InputError
from sharpscope.io.atomic import check_can_create
from sharpscope.io.file_sets import replace_files
from sharpscope.io.load_spec import LoadSpec
from sharpscope.settings import as_dict

if TYPE_CHECKING:
    from sharpscope.analysis.landscape import Landscape
    from sharpscope.cli.loading import Loaded

OUTPUTS = ("landscape.json", "landscape.png")


def check_outputs(folder: Path, force: bool) -> None:
    """Refuse a folder path that cannot be written, or one that already holds this command's
    outputs unless ``force``; other files in it are never touched."""
    check_can_create(folder, "`out`", folder=True)
    present = [name for name in OUTPUTS if (folder / name).exists()]
    if present and not force:
        raise InputError(
            f"`out` {folder} already holds {' and '.join(present)}; choose another folder or "
            "pass `force` to overwrite them"
        )


def run_landscape(loaded: Loaded, config: LandscapeConfig, quiet: bool) -> Landscape:
    """Evaluate the landscape with progress bars (rank 0's only)."""
    from sharpscope import distributed
    from sharpscope.analysis.landscape import landscape

    with ProgressBars(not quiet and distributed.is_main()) as bars:
        result = landscape(  # load_inputs ran the first batch: checked
            loaded.model, loaded.loss_fn, loaded.batches, config, progress=bars, checked=True
        )
        bars.finish()
    return result


def write_outputs(folder: Path, result: Landscape, loaded: Loaded) -> list[Path]:
    """Write landscape.json and landscape.png as one set (:func:`replace_files`: an interrupted
    write leaves the previous pair); return their paths."""
    from sharpscope.report.landscape_document import landscape_document, landscape_json
    from sharpscope.report.plots import plot_landscape

    inputs = replace(loaded.description, config=as_dict(result.config))
    document = landscape_document(result, inputs)
    json_name, png_name = OUTPUTS

    def write(stage: Path) -> list[str]:
        plot_landscape(document, stage / png_name)
        (stage / json_name).write_text(landscape_json(document), encoding="utf-8")
        return [png_name, json_name]

    return replace_files(folder, write)


@declared_command("landscape")
def landscape_command(checkpoint: Checkpoint, settings: Values) -> None:
    """The loss around a checkpoint's weights on a line and a 2-D grid, as a PNG (line, contours,
    surface) and as JSON.

    Every point is the mean loss over all of --samples (the total with --reduction sum). Under
    torchrun every rank evaluates its share of the points on all data; rank 0 writes files. Exit
    code 0 when done, 2 on bad input (one line on stderr), 130 on Ctrl-C.

    Examples:

        sharpscope landscape sharpscope-demo/digits-mlp.safetensors \\
            --data digits --out landscape/

        sharpscope landscape net.pt --model resnet18 --data cifar-10-python/ \\
            --directions eigen --span 0.5 --grid 31 --out landscape-eigen/
    """
    out = settings["out"]
    with command_scope(settings["debug"], settings["dist_timeout"]):
        config = settings.build(LandscapeConfig)
        spec = settings.build(LoadSpec, checkpoint=checkpoint)
        check_outputs(out, settings["force"])
        from sharpscope import distributed  # torch, from here on
        from sharpscope.cli.loading import check_world, load_inputs

        set_threads(settings["threads"])
        loaded = load_inputs(spec)
        if distributed.is_distributed():
            check_world(loaded)
        result = run_landscape(loaded, config, settings["quiet"])
        if distributed.is_main():
            for path in write_outputs(out, result, loaded):
                info(f"wrote {path}")
            info(_summary(result))


def _summary(result: Landscape) -> str:
    """One line: the centre loss, the range seen on the grid and what it cost."""
    finite = [v for row in result.surface for v in row if math.isfinite(v)]
    seen = f"grid loss {min(finite):.6g} .. {max(finite):.6g}" if finite else "no finite grid loss"
    return (
        f"centre loss {result.centre_loss:.6g}; {seen}; {result.evaluations} evaluations in "
        f"{result.seconds:.2g} s"
    )
