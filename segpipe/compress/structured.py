"""Structured pruning: remove whole convolution channels so the network really gets smaller and faster.

Only channels that nothing outside a block depends on are removed, so residual widths and
concatenations stay valid:
- ResNet Bottleneck: the inner outputs of conv1 and conv2 (conv3 and the shortcut are untouched);
- DeepLabV3 head: each ASPP branch, the ASPP projection and the 3x3 head convolution;
- FCN heads (also the auxiliary head): the 3x3 convolution before the classifier;
- the conv-head model (segpipe.convhead): every conv3x3-BN-ReLU of its head.
Each such output is a ChannelGroup: a producing conv, its BatchNorm, and the convs that consume it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPPooling, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from segpipe.convhead import ConvHeadSegmenter

CRITERIA = ("l1", "bn")


class PruningError(ValueError):
    """A pruning request that cannot be carried out, with the reason and the fix."""


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of `conv` (normalised by `bn`) read only by `consumers`: (conv name, input offset)."""
    conv: str
    bn: str
    consumers: tuple[tuple[str, int], ...]


def find_channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every prunable channel group in model, found by module type (Bottleneck, DeepLabHead, FCNHead)."""
    groups: list[ChannelGroup] = []
    for name, module in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(module, Bottleneck) and module.conv2.groups == 1:
            groups.append(ChannelGroup(f"{p}conv1", f"{p}bn1", ((f"{p}conv2", 0),)))
            groups.append(ChannelGroup(f"{p}conv2", f"{p}bn2", ((f"{p}conv3", 0),)))
        elif isinstance(module, DeepLabHead) and isinstance(module[0], ASPP):
            groups += _aspp_groups(module[0], f"{p}0", after_project=f"{p}1")
            groups.append(ChannelGroup(f"{p}1", f"{p}2", ((f"{p}4", 0),)))
        elif isinstance(module, FCNHead):
            groups.append(ChannelGroup(f"{p}0", f"{p}1", ((f"{p}4", 0),)))
        elif isinstance(module, ConvHeadSegmenter):
            for i in range(len(module.head)):
                consumer = f"{p}head.{i + 1}.0" if i + 1 < len(module.head) else f"{p}classifier"
                groups.append(ChannelGroup(f"{p}head.{i}.0", f"{p}head.{i}.1", ((consumer, 0),)))
    return groups


def _aspp_groups(aspp: ASPP, name: str, after_project: str) -> list[ChannelGroup]:
    """The five ASPP branches feed slices of the projection; the projection feeds the head conv."""
    groups, offset = [], 0
    for i, branch in enumerate(aspp.convs):
        # ASPPPooling starts with its pooling layer, the other branches with the conv.
        c = 1 if isinstance(branch, ASPPPooling) else 0
        groups.append(ChannelGroup(f"{name}.convs.{i}.{c}", f"{name}.convs.{i}.{c + 1}",
                                   ((f"{name}.project.0", offset),)))
        offset += branch[c].out_channels
    groups.append(ChannelGroup(f"{name}.project.0", f"{name}.project.1", ((after_project, 0),)))
    return groups


def kept_count(channels: int, sparsity: float, round_to: int = 8) -> int:
    """How many of `channels` survive `sparsity`, rounded to a multiple of round_to (SIMD-friendly widths)."""
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"--sparsity {sparsity} is outside [0, 1); pass e.g. --sparsity 0.5")
    wanted = channels * (1.0 - sparsity)
    if channels < round_to:
        return max(1, round(wanted))
    return int(min(channels, max(round_to, round(wanted / round_to) * round_to)))


def channel_importance(model: nn.Module, group: ChannelGroup, criterion: str = "l1") -> torch.Tensor:
    """One score per output channel: L1 norm of the conv filter, or |gamma| of its BatchNorm."""
    if criterion == "l1":
        return model.get_submodule(group.conv).weight.detach().abs().sum(dim=(1, 2, 3))
    if criterion == "bn":
        return model.get_submodule(group.bn).weight.detach().abs()
    raise PruningError(f"--criterion {criterion!r} is not known; choose one of {', '.join(CRITERIA)}")


def prune_channels(model: nn.Module, sparsity: float, criterion: str = "l1", round_to: int = 8) -> dict[str, int]:
    """Remove the least important `sparsity` share of every prunable group in place; return kept counts."""
    groups = find_channel_groups(model)
    if not groups:
        raise PruningError(f"{type(model).__name__} has no prunable channel groups (ResNet Bottleneck, DeepLabHead, "
                           f"FCNHead or the conv head); use --method unstructured for this model")
    keep = {}
    for g in groups:
        score = channel_importance(model, g, criterion)
        k = kept_count(score.numel(), sparsity, round_to)
        # Sorted indices keep the surviving channels in their original order (concatenations stay aligned).
        keep[g.conv] = score.topk(k).indices.sort().values
    apply_channel_keep(model, groups, keep)
    return {g.conv: int(keep[g.conv].numel()) for g in groups}


def shrink_to_channels(model: nn.Module, channels: dict[str, int]) -> None:
    """Reshape a freshly built model to the kept channel counts of a pruned one (values come from its state dict)."""
    groups = [g for g in find_channel_groups(model) if g.conv in channels]
    missing = set(channels) - {g.conv for g in groups}
    if missing:
        raise PruningError(f"the pruned artefact names layers this model does not have ({sorted(missing)[:3]}...); "
                           f"was it pruned from another architecture?")
    apply_channel_keep(model, groups, {g.conv: torch.arange(channels[g.conv]) for g in groups})


def apply_channel_keep(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> None:
    """Slice every producer conv + BN to keep[conv] outputs and every consumer conv to the matching inputs."""
    out_idx = {g.conv: keep[g.conv] for g in groups}
    in_mask: dict[str, torch.Tensor] = {}
    for g in groups:
        width = model.get_submodule(g.conv).out_channels
        for consumer, offset in g.consumers:
            mask = in_mask.setdefault(consumer, torch.ones(model.get_submodule(consumer).in_channels, dtype=torch.bool))
            mask[offset:offset + width] = False
            mask[offset + keep[g.conv]] = True
    in_idx = {name: mask.nonzero().flatten() for name, mask in in_mask.items()}
    for name in set(out_idx) | set(in_idx):
        _set_module(model, name, _sliced_conv(model.get_submodule(name), out_idx.get(name), in_idx.get(name)))
    for g in groups:
        _set_module(model, g.bn, _sliced_bn(model.get_submodule(g.bn), out_idx[g.conv]))


def _sliced_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Conv2d:
    """A new Conv2d holding only the selected output filters and input channels of conv."""
    if conv.groups != 1:
        raise PruningError(f"cannot slice a grouped convolution ({conv}); structured pruning supports groups=1 only")
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        b = conv.bias.detach()
        new.bias.data.copy_(b if out_idx is None else b[out_idx])
    return new.train(conv.training)


def _sliced_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    """A new BatchNorm2d holding only the selected channels (affine parameters and running statistics)."""
    new = nn.BatchNorm2d(idx.numel(), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[idx])
            new.bias.copy_(bn.bias[idx])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[idx])
            new.running_var.copy_(bn.running_var[idx])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (Sequential indices included)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prunable_channel_sparsity(channels: dict[str, int], original: dict[str, int]) -> float:
    """Share of the prunable channels actually removed (rounding makes it differ from the request)."""
    return 1.0 - sum(channels.values()) / max(1, sum(original[k] for k in channels))


def group_widths(model: nn.Module) -> dict[str, int]:
    """Current output width of every prunable group's conv."""
    return {g.conv: model.get_submodule(g.conv).out_channels for g in find_channel_groups(model)}
