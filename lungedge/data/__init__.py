"""Data sets on disk: layouts, image scanning, near-duplicate groups and split manifests."""
