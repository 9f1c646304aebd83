"""Tar shards in the WebDataset layout: written once from a folder data set, read locally or from object storage.

    python -m segpipe.shards write ROOT OUT [--shard-size 256MB]   # OUT/train-000000.tar ... + OUT/shards.json
    python train.py --config my.yaml data.root=OUT/shards.json      # or https://..., s3://..., gs://.../shards.json

A shard holds NAME.jpg + NAME.mask.png members with the original bytes; the descriptor (shards.json) lists the
shards with their sizes, sha256 checksums and where each member's bytes start, so a reader seeks straight to a
sample (SegmentationDataset over a ShardIndex) and the samplers keep their meaning. Remote shards are downloaded
whole into a local cache (data.cache_dir, data.cache_limit) and verified. Reading remote shards needs fsspec and
aiohttp (`pip install segpipe[shards]`), imported only then.
"""
from segpipe.shards.descriptor import DESCRIPTOR_NAME, is_descriptor, read_descriptor
from segpipe.shards.index import ShardIndex, open_index, open_split
from segpipe.shards.store import ShardStore
from segpipe.shards.write import describe_shard, index_shards, write_shards

__all__ = ["DESCRIPTOR_NAME", "ShardIndex", "ShardStore", "describe_shard", "index_shards", "is_descriptor",
           "open_index", "open_split", "read_descriptor", "write_shards"]
