"""Images on disk to batches: listing class folders, label files and packs, opening them one way (sources),
decoding and preprocessing, splits in memory or streamed, loaders, augmentation, the feature cache."""
