"""Typer option declarations shared by the commands that load a model and data (torch-free:
help and option errors never load torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sharpscope.choices import BACKENDS, CURVATURE_NAMES, DTYPE_NAMES, SOLVER_NAMES

LOAD = "Model and data"
RUN = "Run"
HESSIAN = "Hessian"
SAM = "SAM alignment"
ADAPTIVE = "Adaptive sharpness"

SPLIT, BATCH_SIZE, SAMPLES, LOSS = "train", 128, 1024, "auto"
REDUCTION, INPUT_STYLE = "mean", "auto"
TEXT_FIELD, LABEL_FIELD = "text", "label"
DTYPE, DEVICE = "float32", "auto"
"""Defaults of the loading options, shared by every command."""

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="Model checkpoint: state dict (.pt/.pth/.bin), .safetensors, torch.export .pt2, "
        "TorchScript (with --trust-code), a pickled module (with --trust-pickle), or a Hugging "
        "Face save_pretrained folder (needs sharpscope\\[hf]).",
        show_default=False,
        metavar="CHECKPOINT",
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data: 'digits', a tensor file (.pt/.safetensors/.npz), a text file (.jsonl/.csv, "
        "tokenized with a save_pretrained CHECKPOINT's tokenizer), a datasets save_to_disk "
        "folder, a CIFAR folder, an image folder, or pkg.module:function. See docs/data.md.",
        rich_help_panel=LOAD,
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="For weight-only checkpoints: a built-in name (mlp, cnn, resnet18), "
        "pkg.module:factory or path/to/file.py:factory.",
        rich_help_panel=LOAD,
    ),
]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="key=value keyword argument for the model factory (repeatable; Python literals).",
        rich_help_panel=LOAD,
    ),
]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow checkpoints that hold arbitrary pickled Python objects. Unpickling runs code: "
        "only for files you trust.",
        rich_help_panel=LOAD,
    ),
]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow code that comes from inside a file to be imported or run: a TorchScript "
        "archive (its code runs as it loads and can write files), a .pt2 graph calling more than "
        "tensor computations, a model spec stored in a checkpoint or run folder that names code "
        "rather than a built-in model, and code specs from a config file found by search. Only "
        "for files you trust.",
        rich_help_panel=LOAD,
    ),
]
StatePrefix = Annotated[
    str | None,
    typer.Option(
        "--state-prefix",
        help="Load the checkpoint's weights under this key prefix (e.g. 'ema.' of a Lightning "
        ".ckpt that holds two networks). Without it, one prefix shared by every weight is "
        "stripped when the rest of the names are the model's.",
        rich_help_panel=LOAD,
        show_default=False,
    ),
]
Split = Annotated[str, typer.Option(help="Data split.", rich_help_panel=LOAD)]
TextField = Annotated[
    str,
    typer.Option(
        help="Text data: the field holding the text, or a pair of fields like sentence1,sentence2.",
        rich_help_panel=LOAD,
    ),
]
LabelField = Annotated[
    str,
    typer.Option(
        help="Text data: the field holding the labels (class ids, or names in the config's "
        "label2id); '' for language-modelling labels.",
        rich_help_panel=LOAD,
    ),
]
MaxLength = Annotated[
    int | None,
    typer.Option(
        help="Text data: truncate to this many tokens. Default: the model's positions.",
        rich_help_panel=LOAD,
        show_default=False,
    ),
]
BatchSize = Annotated[int, typer.Option(help="Samples per batch.", rich_help_panel=LOAD)]
Samples = Annotated[
    int,
    typer.Option(
        help="How many samples the Hessian averages over (a fixed random subset for --seed); "
        "0 = all of the split.",
        rich_help_panel=LOAD,
    ),
]
Loss = Annotated[
    str,
    typer.Option(
        help="auto (by model type), cross-entropy, mse, causal-lm, masked-lm, or "
        "pkg.module:function.",
        rich_help_panel=LOAD,
    ),
]
Reduction = Annotated[
    str,
    typer.Option(
        help="How the loss reduces a batch: mean (the curvature of the mean loss) or sum (of the "
        "total loss; a built-in loss then sums). A --loss function is checked on the halves of "
        "a batch.",
        rich_help_panel=LOAD,
    ),
]
InputStyle = Annotated[
    str,
    typer.Option(
        help="How a mapping of input fields reaches the model: kwargs (model(**fields)), single "
        "(model(fields), one argument), or auto (from the model's forward signature).",
        rich_help_panel=LOAD,
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN)]
Dtype = Annotated[str, typer.Option(help=f"{' or '.join(DTYPE_NAMES)}.", rich_help_panel=RUN)]
Threads = Annotated[
    int | None,
    typer.Option(
        help="torch's intra-op CPU threads (per rank under torchrun). Default: torch's own (the "
        "cores, or OMP_NUM_THREADS); on a busy machine fewer can be faster.",
        rich_help_panel=RUN,
        min=1,
        show_default=False,
    ),
]
Seed = Annotated[
    int, typer.Option(help="Seed for data subsets and random vectors.", rich_help_panel=RUN)
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Hide progress bars.", rich_help_panel=RUN)
]
Debug = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks on errors.", rich_help_panel=RUN)
]
Json = Annotated[
    bool, typer.Option("--json", help="Print the report as JSON on stdout.", rich_help_panel=RUN)
]
TopK = Annotated[
    int, typer.Option("--top-k", "-k", help="How many top eigenpairs.", rich_help_panel=HESSIAN)
]
Method = Annotated[
    str, typer.Option(help=f"Eigen-solver: {', '.join(SOLVER_NAMES)}.", rich_help_panel=HESSIAN)
]
Tol = Annotated[
    float,
    typer.Option(help="Stop when every residual ‖Hv − λv‖ ≤ tol·|λ_max|.", rich_help_panel=HESSIAN),
]
MaxIter = Annotated[
    int,
    typer.Option(
        help="Most Hessian-vector products per solve (Lanczos: then one more per returned pair, "
        "which measures its true residual).",
        rich_help_panel=HESSIAN,
    ),
]
MaxBasis = Annotated[
    int | None,
    typer.Option(
        help="Lanczos: keep at most this many vectors of the model's size in memory (thick "
        "restarts; more products, raise --max-iter). Default: all.",
        rich_help_panel=HESSIAN,
    ),
]
Trace = Annotated[bool, typer.Option(help="Estimate the trace (Hutch++).", rich_help_panel=HESSIAN)]
Shards = Annotated[
    int,
    typer.Option(
        help="Disjoint shards of the samples for each figure's spread over other samples of "
        "this size (a jackknife: about top-k + 11 more products); 0 = off.",
        rich_help_panel=HESSIAN,
    ),
]
Bias = Annotated[
    bool,
    typer.Option(
        help="Also estimate each figure's sample-size bias by solving it on every shard (about "
        "one more eigen-solve); the spread's intervals then allow for it.",
        rich_help_panel=HESSIAN,
    ),
]
Params = Annotated[
    list[str] | None,
    typer.Option(
        "--params",
        help="Only parameters whose name matches this glob (repeatable), e.g. 'fc.*'.",
        rich_help_panel=HESSIAN,
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Leave out parameters whose name matches this glob (repeatable; after --params), "
        "e.g. '*word_embeddings*'.",
        rich_help_panel=HESSIAN,
    ),
]
BatchStats = Annotated[
    bool,
    typer.Option(
        "--batch-stats",
        help="BatchNorm on batch statistics (train mode) instead of running statistics.",
        rich_help_panel=HESSIAN,
    ),
]
Backend = Annotated[
    str, typer.Option(help=f"HVP backend: {', '.join(BACKENDS)}.", rich_help_panel=HESSIAN)
]
Curvature = Annotated[
    str,
    typer.Option(
        help=f"The matrix analysed: {', '.join(CURVATURE_NAMES)} (fisher: labels drawn from the "
        "model, seeded by --seed; empirical-fisher: the data's labels). See docs/engine.md.",
        rich_help_panel=HESSIAN,
    ),
]
Rho = Annotated[float, typer.Option(help="SAM radius ρ.", rich_help_panel=SAM)]
Alpha = Annotated[float, typer.Option(help="Eigen-SAM's α.", rich_help_panel=SAM)]
AdaptiveSharpness = Annotated[
    str | None,
    typer.Option(
        help="Also measure the worst-case (ascent) or average-case (random draws) sharpness "
        "L(w+δ) − L(w) over ‖δ/|w|‖ ≤ ρ: worst or average (Andriushchenko et al. 2023).",
        rich_help_panel=ADAPTIVE,
        show_default=False,
    ),
]
AdaptiveNorm = Annotated[
    str,
    typer.Option(
        help="Its ball: l2 or linf (average case: Gaussian or uniform draws).",
        rich_help_panel=ADAPTIVE,
    ),
]
AdaptiveRho = Annotated[float, typer.Option(help="Its radius ρ.", rich_help_panel=ADAPTIVE)]
AdaptiveSteps = Annotated[
    int,
    typer.Option(
        help="Its ascent steps (worst) or random draws (average).", rich_help_panel=ADAPTIVE
    ),
]
AdaptiveScale = Annotated[
    bool,
    typer.Option(
        help="Scale the ball by |w| (adaptive: invariant to rescaling layers); off: a plain ball.",
        rich_help_panel=ADAPTIVE,
    ),
]
