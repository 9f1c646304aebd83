"""Model compression: structured and unstructured pruning, int8 / bf16 quantization.

Command line: `python -m segpipe.compress prune|quantize ...` (see __main__.py). The files it writes load
through segpipe.model_files.load_model, like every other model file.
"""
from segpipe.compress.int8 import quantize_int8, untie_relus
from segpipe.compress.structured import find_channel_groups, prune_channels, shrink_to_channels
from segpipe.compress.unstructured import prune_unstructured, weight_sparsity

__all__ = ["quantize_int8", "untie_relus", "find_channel_groups", "prune_channels", "shrink_to_channels",
           "prune_unstructured", "weight_sparsity"]
