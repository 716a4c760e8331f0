"""Teacher-output cache (FKD-style): views stored as augmentation parameters, the teachers'
top-k soft labels in sharded safetensors files, replayed and looked up while training.

- :mod:`distill.data.transforms` (outside this package): training augmentation split at its
  random draws, so a view is a small record (crop box, flip, seed of the later random ops)
  that replays exactly.
- :mod:`distill.cache.items`: raw training items, the build's and the training's datasets.
- :mod:`distill.cache.topk`: top-k soft labels and their reconstruction to full logits.
- :mod:`distill.cache.sketch`: a low-rank sketch of each teacher's logits, the shape of the tail top-k drops.
- :mod:`distill.cache.store`: the on-disk format (shards + index JSON), key, checksums, lookup.
- :mod:`distill.cache.shards`: shards read row by row (nothing of the cache held in memory).
- :mod:`distill.cache.build`: runs the pool once per view and writes the shards (resumable).
- :mod:`distill.cache.recipes`: from a recipe to its cache (``run.teacher_cache``, ``distill-cache``).
- :mod:`distill.cache.projection`: a recipe's cache size before it is built (``distill-cache info``).
"""
