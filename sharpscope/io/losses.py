"""Loss specs: ``auto``, ``cross-entropy`` (``ce``), ``mse``, ``causal-lm``, ``masked-lm``,
``pkg.module:function`` or ``file.py:function``.

A loss returns the mean over the batch (``reduction`` mean, the default): over its samples, or
over its labelled tokens for the built-in token losses (whose ``count`` says how many, so that
batches are weighted by it: :func:`sharpscope.batches.loss_weight`); or, with ``reduction`` sum,
the sum over them. A built-in loss reduces as asked and says so in its ``reduction``; a user's
loss is checked by the curvature operator on the halves of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sharpscope.batches import Draw, LossFn, logits_of
from sharpscope.errors import InputError
from sharpscope.io.user_code import import_object, is_object_spec, one_line

IGNORE_INDEX = -100
"""The label that marks a position without a target (Hugging Face's and torch's convention)."""


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (N, C, ...) against class indices (``-100``: no label), or
    against class probabilities shaped like the logits."""
    if targets.is_floating_point() and targets.shape != outputs.shape:
        raise InputError(
            f"cross-entropy needs class labels, but the targets are floats of shape "
            f"{tuple(targets.shape)} against outputs {tuple(outputs.shape)}; for regression "
            "pass `loss` mse"
        )
    total = F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / max(_labelled(targets), 1)


def _labelled(targets: Tensor) -> int:
    """The terms cross-entropy averages: labelled positions, or samples x positions for
    probabilities (N, C, ...)."""
    if targets.is_floating_point():
        return targets.numel() // int(targets.shape[1]) if targets.ndim > 1 else 1
    return int((targets != IGNORE_INDEX).sum())


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over samples and outputs (as ``nn.MSELoss``); class labels are compared
    as one-hot vectors as wide as the outputs."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, int(outputs.shape[1])).movedim(-1, 1).to(outputs.dtype)
    elif targets.shape != outputs.shape:
        if targets.numel() != outputs.numel():
            raise InputError(
                f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)}; give the model one output per target value"
            )
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets)


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Cross-entropy over the tokens of sequences: logits (N, L, V) against labels (N, L), mean
    over the labelled tokens (not ``-100``). With ``shift`` each position predicts the next one's
    label (a causal LM, as ``model(input_ids=x, labels=x).loss``); else its own (a masked LM)."""

    shift: bool

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits, labels = self._aligned(outputs, targets)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / max(int((labels != IGNORE_INDEX).sum()), 1)

    def count(self, targets: Tensor) -> int:
        """The predicted tokens of a batch: its labelled positions (after the shift)."""
        labels = targets[:, 1:] if self.shift else targets
        return int((labels != IGNORE_INDEX).sum())

    def _aligned(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        name = "causal-lm" if self.shift else "masked-lm"
        if logits.ndim != 3 or targets.is_floating_point() or targets.shape != logits.shape[:2]:
            raise InputError(
                f"{name} needs logits (batch, tokens, vocabulary) and integer labels (batch, "
                f"tokens); got logits {tuple(logits.shape)} and labels {tuple(targets.shape)} "
                f"({targets.dtype}); pass `loss` cross-entropy for one label per sample"
            )
        highest = int(targets.max()) if targets.numel() else -1
        if highest >= logits.shape[-1]:
            raise InputError(
                f"{name}: a label is token {highest} but the model scores "
                f"{logits.shape[-1]} tokens; use labels from the model's tokenizer"
            )
        if self.shift:
            return logits[:, :-1], targets[:, 1:]
        return logits, targets


@dataclass(frozen=True)
class BuiltinLoss:
    """A built-in loss on the logits of a model's outputs (a tensor, a ``ModelOutput``, dict or
    tuple), refusing logits narrower than the data's ``num_classes`` with a clear error (torch's
    own is an index error, a device-side assert on CUDA)."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    counter: Callable[[Tensor], int]
    """The terms ``fn``'s batch mean is over, from the targets."""
    num_classes: int | None = None
    reduction: str = "mean"
    """``mean`` over the batch's terms, or ``sum`` (the mean times :meth:`count`)."""

    def __call__(self, outputs: Any, targets: Tensor) -> Tensor:
        logits = logits_of(outputs)
        if logits is None:
            raise InputError(
                f"the model returns a {type(outputs).__name__} without logits, which the "
                f"{self.name} loss needs; pass `loss` a function of the raw outputs"
            )
        if self.num_classes is not None and self.per_sample:
            _check_width(logits, self.num_classes)
        mean = self.fn(logits, targets)
        return mean if self.reduction == "mean" else mean * self.count(targets)

    @property
    def per_sample(self) -> bool:
        """Whether the outputs score each sample as a whole (not token by token)."""
        return not isinstance(self.fn, TokenCrossEntropy)

    def count(self, targets: Tensor) -> int:
        """The terms this loss's batch mean is over (samples for mse)."""
        return self.counter(targets)

    def term_dims(self, logits: Tensor) -> tuple[int, ...]:
        """The dimensions of the logits that one term of the mean spans: the classes (dimension
        1; a token loss's vocabulary, the last), or for mse all but the samples'."""
        if self.name == "mse":
            return tuple(range(1, logits.ndim))
        return (1,) if self.per_sample else (logits.ndim - 1,)

    def sample_targets(self, logits: Tensor, targets: Tensor, draw: Draw) -> Tensor:
        """Targets drawn from the predictive distribution this loss is the negative
        log-likelihood of: a class from the softmax (positions labelled -100 stay unlabelled,
        a causal LM's label t+1 comes from position t), or for mse a Gaussian around the outputs
        of variance D/2 per output (D outputs per sample, as mse averages over them)."""
        logits = logits.detach()
        if self.name == "mse":
            width = logits[0].numel() if logits.ndim > 1 else 1
            u = draw(tuple(logits.shape[1:])).clamp(2**-53, 1 - 2**-53)
            noise = math.sqrt(2) * torch.erfinv(2 * u - 1)
            return logits + math.sqrt(width / 2) * noise.to(logits.dtype)
        if self.per_sample:
            drawn = _categorical(logits.movedim(1, -1), draw(tuple(logits.shape[2:])))
            if targets.is_floating_point():
                return drawn
        else:
            drawn = _categorical(logits, draw(tuple(logits.shape[1:-1])))
            if isinstance(self.fn, TokenCrossEntropy) and self.fn.shift:
                drawn = torch.cat([targets[:, :1], drawn[:, :-1]], dim=1)
        return torch.where(targets == IGNORE_INDEX, targets, drawn)


def _categorical(logits: Tensor, u: Tensor) -> Tensor:
    """The class of each row of ``logits`` (classes last) that uniform ``u`` picks from its
    softmax by the inverse of the cumulative distribution."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    return (cdf < u.to(cdf).unsqueeze(-1)).sum(-1).clamp(max=logits.shape[-1] - 1)


def _samples(targets: Tensor) -> int:
    return int(targets.shape[0])


CAUSAL_LM, MASKED_LM = TokenCrossEntropy(shift=True), TokenCrossEntropy(shift=False)
BUILTIN_LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], int]]] = {
    "cross-entropy": (cross_entropy, _labelled),
    "mse": (mse, _samples),
    "causal-lm": (CAUSAL_LM, CAUSAL_LM.count),
    "masked-lm": (MASKED_LM, MASKED_LM.count),
}
"""Each built-in loss and how many terms its batch mean is over."""
ALIASES = {"ce": "cross-entropy"}
AUTO = "auto"
LOSS_CHOICES = (
    "auto, cross-entropy (or ce), mse, causal-lm, masked-lm, or pkg.module:function / "
    "path/to/file.py:function"
)


def loss_name(spec: str, model: Any = None) -> str:
    """The canonical name of a built-in loss spec (``auto``: the loss the model's type calls for,
    see :func:`default_loss`); other specs unchanged."""
    key = _canonical(spec)
    if key == AUTO:
        return default_loss(model)
    return key if key in BUILTIN_LOSSES else spec


def _canonical(spec: str) -> str:
    key = spec.strip().lower().replace("_", "-")
    return ALIASES.get(key, key)


def default_loss(model: Any) -> str:
    """The loss a Hugging Face model's task implies: next-token cross-entropy for a causal LM,
    masked-token cross-entropy for a masked LM, mse for a one-label (regression) sequence
    classifier; cross-entropy otherwise. A PEFT model's task is its base model's."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    config = getattr(model, "config", None)
    regression = getattr(config, "problem_type", None) == "regression" or (
        name.endswith("ForSequenceClassification") and getattr(config, "num_labels", 0) == 1
    )
    return "mse" if regression else "cross-entropy"


def resolve_loss(
    spec: str = "cross-entropy", num_classes: int | None = None, reduction: str = "mean"
) -> LossFn:
    """The loss ``(outputs, targets) -> scalar`` a loss spec names (``auto`` must be resolved by
    :func:`loss_name` first): a built-in loss reduced by ``reduction`` (mean or sum), a user's as
    it is. With the data's ``num_classes``, a built-in loss refuses outputs narrower than the
    classes. Built-in losses read the logits of the outputs; a user's loss receives them raw."""
    key = _canonical(spec)
    if reduction not in ("mean", "sum"):
        raise InputError(f"unknown `reduction` {reduction!r}; choose one of mean, sum")
    if key in BUILTIN_LOSSES:
        fn, counter = BUILTIN_LOSSES[key]
        return BuiltinLoss(key, fn, counter, num_classes, reduction)
    if key == AUTO:
        raise ValueError("`loss` auto depends on the model: resolve it with loss_name first")
    if is_object_spec(spec):
        return _user_loss(spec)
    raise InputError(f"unknown loss {spec!r}; pass {LOSS_CHOICES}")


def _check_width(logits: Tensor, num_classes: int) -> None:
    width = int(logits.shape[1]) if logits.ndim >= 2 else 1
    if width < num_classes:
        raise InputError(
            f"the labels go up to {num_classes - 1} but the model has {width} output"
            f"{'s' if width != 1 else ''}; use a model with {num_classes} outputs"
        )


def _user_loss(spec: str) -> LossFn:
    """A user's loss function, or a loss class (e.g. ``torch.nn:SmoothL1Loss``) made with no
    arguments; its result is checked to be a scalar. The ``reduction`` a torch loss states
    (``mean`` or ``sum``) is kept as the wrapper's."""
    loss: Any = import_object(spec, "`loss`")
    if isinstance(loss, type):
        try:
            loss = loss()
        except Exception as exc:
            raise InputError(
                f"`loss` {spec}: making {loss.__name__}() failed ({one_line(exc)}); name a "
                "function or a class that needs no arguments"
            ) from exc
    if not callable(loss):
        raise InputError(
            f"`loss` {spec} is a {type(loss).__name__}, not a function; name a function "
            "(outputs, targets) -> mean loss"
        )

    def checked(outputs: Tensor, targets: Tensor) -> Tensor:
        try:
            value = loss(outputs, targets)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"`loss` {spec} raised {one_line(exc)}; fix the function") from exc
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(
                f"`loss` {spec} returned {shape}, not a scalar tensor; it must return the mean "
                "loss of the batch (or its sum, with `reduction` sum)"
            )
        return value.reshape(())

    stated = getattr(loss, "reduction", None)
    if stated in ("mean", "sum"):
        checked.reduction = stated  # type: ignore[attr-defined]
    return checked
