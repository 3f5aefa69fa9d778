"""What to load: :class:`LoadSpec`, the checkpoint, model, data and loss every command reads, with
the defaults and help of each setting (torch-free: the command line checks it before loading)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sharpscope.choices import DTYPE_NAMES
from sharpscope.errors import InputError, check_choice
from sharpscope.settings import setting

LOAD = "Model and data"
RUN = "Options"
"""The help panel of how a command runs and what it writes (where ``--help`` itself is listed)."""


@dataclass(frozen=True)
class LoadSpec:
    """A checkpoint, its model, the data and the loss, as a command loads them
    (:func:`sharpscope.cli.loading.load_inputs`); checked when made.

    Example:
        >>> LoadSpec(Path("net.pt"), "digits", model="mlp", samples=64).batch_size
        128
    """

    checkpoint: Path | None = setting(
        None,
        help="Model checkpoint: a state dict, .safetensors, .pt2, TorchScript, a pickled module, "
        "a save_pretrained folder (needs sharpscope\\[hf]) or a PEFT LoRA adapter folder (needs "
        "sharpscope\\[peft]; see --base). A state dict is a .pt/.pth/.bin file; .pt2 a "
        "torch.export archive; TorchScript needs --trust-code and a pickled module "
        "--trust-pickle.",
        flag="CHECKPOINT",
        cli=False,
        in_file=False,
    )
    data: str | None = setting(
        None,
        help="Data: 'digits', a tensor or text file, a data folder, or pkg.module:function. "
        "Tensor files: .pt/.safetensors/.npz; text files (.jsonl/.csv) are tokenized with a "
        "save_pretrained CHECKPOINT's tokenizer; folders: a datasets save_to_disk folder, a "
        "CIFAR folder or an image folder. See docs/data.md.",
        common=True,
        panel=LOAD,
        kind="data",
        code=True,
    )
    model: str | None = setting(
        None,
        help="The model of a weight-only checkpoint: mlp, cnn, resnet18 or a factory. A factory "
        "is pkg.module:factory or path/to/file.py:factory.",
        common=True,
        panel=LOAD,
        code=True,
    )
    model_args: list[str] | None = setting(
        None,
        help="key=value keyword argument for the model factory (repeatable). Values are Python "
        "literals.",
        flag="--model-arg",
        common=True,
        panel=LOAD,
    )
    trust_pickle: bool = setting(
        False,
        help="Allow checkpoints that hold arbitrary pickled Python objects. Unpickling runs code: "
        "only for files you trust.",
        panel=LOAD,
        in_file=False,
    )
    trust_code: bool = setting(
        False,
        help="Allow code that comes from inside a file to be imported or run: a TorchScript "
        "archive (its code runs as it loads and can write files), a .pt2 graph calling more than "
        "tensor computations, a model spec stored in a checkpoint or run folder that names code "
        "rather than a built-in model, and code specs from a config file found by search. Only "
        "for files you trust.",
        panel=LOAD,
        in_file=False,
    )
    state_prefix: str | None = setting(
        None,
        help="Load the checkpoint's weights under this key prefix (e.g. 'ema.' of a Lightning "
        ".ckpt that holds two networks). Without it, one prefix shared by every weight is "
        "stripped when the rest of the names are the model's.",
        panel=LOAD,
    )
    base: Path | None = setting(
        None,
        help="The base model of a PEFT LoRA adapter CHECKPOINT (a folder with "
        "adapter_config.json; needs sharpscope\\[peft]): its save_pretrained folder. Default: "
        "the adapter config's base_model_name_or_path when that is a local folder.",
        panel=LOAD,
    )
    split: str = setting("train", help="Data split.", panel=LOAD)
    samples: int = setting(
        1024,
        help="How many samples the Hessian averages over; 0: all of the split. A fixed random "
        "subset for --seed.",
        common=True,
        panel=LOAD,
    )
    batch_size: int = setting(128, help="Samples per batch.", panel=LOAD)
    text_field: str = setting(
        "text",
        help="Text data: the field holding the text, or a pair of fields like sentence1,sentence2.",
        panel=LOAD,
    )
    label_field: str = setting(
        "label",
        help="Text data: the field holding the labels (class ids, or names in the config's "
        "label2id); '' for language-modelling labels.",
        panel=LOAD,
    )
    max_length: int | None = setting(
        None,
        help="Text data: truncate to this many tokens. Default: the model's positions.",
        panel=LOAD,
    )
    loss: str = setting(
        "auto",
        help="auto (by model type), cross-entropy, mse, causal-lm, masked-lm, or "
        "pkg.module:function.",
        panel=LOAD,
        code=True,
    )
    reduction: str = setting(
        "mean",
        help="How the loss reduces a batch: mean (the curvature of the mean loss) or sum (of the "
        "total loss; a built-in loss then sums). A --loss function is checked on the halves of "
        "a batch.",
        panel=LOAD,
    )
    input_style: str = setting(
        "auto",
        help="How a mapping of input fields reaches the model: kwargs (model(**fields)), single "
        "(model(fields), one argument), or auto (from the model's forward signature).",
        panel=LOAD,
    )
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.", common=True, panel=RUN)
    dtype: str = setting(
        "float32",
        help=f"{', '.join(DTYPE_NAMES)}: of the weights and the products (bfloat16 weights are "
        "widened to float32 unless bfloat16 is asked; its products err by about 1e-2).",
        panel=RUN,
    )
    seed: int = setting(0, help="Seed for data subsets and random vectors.", panel=RUN)

    def __post_init__(self) -> None:
        if self.data is None:
            raise InputError("pass `data` (the data to load), on the command line or in a config")
        check_choice("dtype", self.dtype, DTYPE_NAMES)
