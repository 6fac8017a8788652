"""The file format owns itself: schema, durable writes, shards, assembly, merge, the reader.

``schema`` names every dataset and attribute; ``durable`` is the one way a file is written
(``atomic_output``, the lock, HDF5 that survives a full disk); ``shards`` and ``assemble`` make
the output; ``merge`` joins ``--shard K/N`` parts; ``reader.FeatureFile`` is what users import.
"""

from featx.store.reader import FeatureFile

__all__ = ["FeatureFile"]
