"""A tiny Llama-style causal LM with a PEFT LoRA adapter, built from configs (no download): the
model ``peft`` users fine-tune, for the tests of sharpscope on a ``PeftModel``."""

from __future__ import annotations

import ground_truth
import tiny_hf
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

TARGETS = ("q_proj", "v_proj")
"""The modules the adapter wraps (PEFT's default for Llama)."""


class ExactRMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm in the input's dtype: Llama's own computes in float32, which puts float32
    rounding into a float64 model's gradients (1e-7 relative) and spoils a float64 reference."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def base(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The tests' tiny Llama (:func:`tiny_hf.llama`: RMSNorm, rotary positions, grouped-query
    attention, SiLU gate; about 700 parameters) in ``dtype``, its norms :class:`ExactRMSNorm`."""
    model = tiny_hf.llama().to(dtype)
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.__class__ = ExactRMSNorm
    return model


def lora(dtype: torch.dtype = torch.float32, **options: object) -> PeftModel:
    """:func:`base` with a rank-2 LoRA adapter on ``q_proj`` and ``v_proj``, its B matrices drawn
    at random (PEFT's default zeros would make B's Hessian block degenerate); ``options`` go to
    ``LoraConfig`` (``modules_to_save``, ...)."""
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **options,
    )
    model = base(dtype)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def tokens(count: int = 4, length: int = 10, seed: int = 0) -> torch.Tensor:
    """``count`` random sequences of ``length`` token ids."""
    return torch.randint(
        0, tiny_hf.VOCAB, (count, length), generator=torch.Generator().manual_seed(seed)
    )


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that do not require grad (the frozen base)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def next_token_loss(outputs: object, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token."""
    logits = outputs.logits[:, :-1]  # type: ignore[attr-defined]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def dense_hessian(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The Hessian of :func:`next_token_loss` on ``ids`` over the parameters that require grad
    (:func:`ground_truth.dense_hessian`: autograd double backward, the ground truth)."""
    return ground_truth.dense_hessian(model, next_token_loss, {"input_ids": ids}, ids)
