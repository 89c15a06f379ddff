"""From shards to batches on the host: the pipelines (`streams`), the DataLoaders and their workers
(`loaders`, `fork_server`, `worker_watch`), batches in shared memory (`batches`, `batch_memory`), and
augmentation on the device (`augment`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "ShardSet": "luna_dist.data.streams",
    "open_shard_set": "luna_dist.data.streams",
    "TrainStreamConfig": "luna_dist.data.streams",
    "ClassStream": "luna_dist.data.streams",
    "train_loader": "luna_dist.data.loaders",
    "val_loader": "luna_dist.data.loaders",
    "AugmentConfig": "luna_dist.data.augment",
})
