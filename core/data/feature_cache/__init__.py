"""The frozen backbone's features of a whole dataset, computed once and shared by every run.

A cache is a folder ``<root>/<backbone>-<img_size>px-<key>/`` holding, per split, Arrow IPC
shards (one record batch of ``rows`` frames each, a FixedSizeList<uint16> column: the bf16 or
fp16 bits of the (P, F) features) and ``manifest.json``: the key's inputs, every video's frame
count, every shard's rows, bytes and blake2b digest.

- :mod:`core.data.feature_cache.key`: which cache a run needs (the key, the folder name, where
  caches live) and whether its features can come from one at all.
- :mod:`core.data.feature_cache.reader`: opening and checking a cache, reading its features.
- :mod:`core.data.feature_cache.build`: building a missing or damaged cache, once, under a lock.
"""
