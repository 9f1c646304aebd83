"""Model compression: structured and unstructured pruning, int8 / bf16 quantization, one artefact loader.

Command line: `python -m segpipe.compress prune|quantize ...` (see __main__.py).
Library: load_artefact / is_artefact for predictors, model_from_checkpoint for training's init_from.
"""
from segpipe.compress.artefact import is_artefact, load_artefact, model_from_checkpoint
from segpipe.compress.int8 import quantize_int8, untie_relus
from segpipe.compress.structured import find_channel_groups, prune_channels, shrink_to_channels
from segpipe.compress.unstructured import prune_unstructured, weight_sparsity

__all__ = ["is_artefact", "load_artefact", "model_from_checkpoint", "quantize_int8", "untie_relus",
           "find_channel_groups", "prune_channels", "shrink_to_channels", "prune_unstructured", "weight_sparsity"]
