"""The file format owns itself: schema, durable writes, the work folder, shards, the features
file writer, assembly, merge, the reader.

``schema`` names every dataset and attribute; ``durable`` is the one way a file is written
(``atomic_output``, the lock, HDF5 that survives a full disk); ``workdir`` is the work folder a
run resumes from; ``shards`` writes its shard files; ``features_file`` is the one writer of the
output, which ``assemble`` (shards) and ``merge`` (``--shard K/N`` parts) both use;
``reader.FeatureFile`` is what users import.
"""

from featx.store.reader import FeatureFile

__all__ = ["FeatureFile"]
