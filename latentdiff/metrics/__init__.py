"""The evaluation stage: feature extractors, statistics, distances and reference files (FID)."""
