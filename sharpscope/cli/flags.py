"""Library parameter names -> the command-line options that set them, for error messages.

Library errors name parameters in backticks (:class:`sharpscope.errors.InputError`); the CLI
boundary shows them as options with :func:`as_flags`.
"""

from __future__ import annotations

import re

FLAGS: dict[str, str] = {
    # loading (sharpscope.cli.loading.load_inputs and the io layer)
    "checkpoint": "CHECKPOINT",
    "model": "--model",
    "model_args": "--model-arg",
    "trust_pickle": "--trust-pickle",
    "trust_code": "--trust-code",
    "state_prefix": "--state-prefix",
    "data": "--data",
    "split": "--split",
    "samples": "--samples",
    "text_field": "--text-field",
    "label_field": "--label-field",
    "max_length": "--max-length",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "loss": "--loss",
    "reduction": "--reduction",
    "input_style": "--input-style",
    "device": "--device",
    "dtype": "--dtype",
    "timeout_s": "--dist-timeout",
    "threads": "--threads",
    # analysis (sharpscope.analysis.analyze.AnalyzeConfig)
    "k": "--top-k",
    "method": "--method",
    "tol": "--tol",
    "max_iter": "--max-iter",
    "max_basis": "--max-basis",
    "trace": "--trace/--no-trace",
    "shards": "--shards",
    "bias": "--bias/--no-bias",
    "density": "--density",
    "per_layer": "--per-layer",
    "params": "--params",
    "exclude": "--exclude",
    "batch_stats": "--batch-stats",
    "backend": "--backend",
    "curvature": "--curvature",
    "rho": "--rho",
    "alpha": "--alpha",
    "adaptive_sharpness": "--adaptive-sharpness",
    "adaptive_norm": "--adaptive-norm",
    "adaptive_rho": "--adaptive-rho",
    "adaptive_steps": "--adaptive-steps",
    "adaptive_scale": "--adaptive-scale/--no-adaptive-scale",
    # the gate (sharpscope.analysis.gate.Thresholds) and its baseline
    "max_eigenvalue": "--max-eigenvalue",
    "min_eigenvalue": "--min-eigenvalue",
    "max_trace": "--max-trace",
    "max_sam_sharpness": "--max-sam-sharpness",
    "min_alignment": "--min-alignment",
    "max_adaptive_sharpness": "--max-adaptive-sharpness",
    "max_increase": "--max-increase",
    "sigmas": "--sigmas",
    "baseline": "--baseline",
    "update_baseline": "--update-baseline",
    "allow_different_data": "--allow-different-data",
    # landscape (sharpscope.analysis.landscape.LandscapeConfig)
    "directions": "--directions",
    "span": "--span",
    "points": "--points",
    "grid": "--grid",
    # outputs
    "out": "--out",
    "force": "--force",
    "junit": "--junit",
    "config": "--config",
    # finetune (sharpscope.training: RunConfig, RunOptions, the run planner and the run folder)
    "val_data": "--val-data",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "per_rank_sam": "--per-rank-sam",
    "freeze": "--freeze",
    "eig_every": "--eig-every",
    "eig_steps": "--eig-steps",
    "schedule": "--schedule",
    "epochs": "--epochs",
    "steps": "--steps",
    "track_every": "--track-every",
    "probe_size": "--probe-size",
    "track_iters": "--track-iters",
    "precision": "--precision",
    "save_every": "--save-every",
    "keep": "--keep",
    "resume": "--resume",
}
"""Parameter name (as the library spells it) -> option (as the user types it)."""

_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def as_flags(message: str) -> str:
    """``message`` with each backticked parameter name shown as its option (a name without an
    option keeps its backticks)."""
    return _NAME.sub(lambda m: FLAGS.get(m[1], m[0]), message)
