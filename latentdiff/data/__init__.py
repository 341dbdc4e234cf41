"""Image decoding, webdataset shards, manifests and dataset statistics."""
