"""Unstructured L1 magnitude pruning of convolution weights with torch.nn.utils.prune, made permanent.

Zeroed weights keep their place in dense tensors: the file and the latency stay the same on CPU
(dense kernels do not skip zeros). Its use is to study how much redundancy a model has.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

SCOPES = ("layer", "global")


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Conv2d and Linear: the layers magnitude pruning applies to."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_unstructured(model: nn.Module, sparsity: float, scope: str = "layer") -> float:
    """Zero the smallest-|w| share `sparsity` of conv/linear weights in place; return the sparsity reached.

    scope "layer" prunes each layer by the same share (the paper's layer-wise pruning); "global" ranks all
    weights together, so layers with many small weights lose more.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity {sparsity} is outside [0, 1); pass e.g. --sparsity 0.5")
    params = prunable_weights(model)
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    elif scope == "layer":
        for module, name in params:
            prune.l1_unstructured(module, name, amount=sparsity)
    else:
        raise ValueError(f"--scope {scope!r} is not known; choose one of {', '.join(SCOPES)}")
    for module, name in params:
        prune.remove(module, name)  # bakes weight_orig * mask into a plain parameter again
    return weight_sparsity(model)


def weight_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero entries among all conv/linear weights."""
    zeros = total = 0
    for module, name in prunable_weights(model):
        w = getattr(module, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(1, total)
