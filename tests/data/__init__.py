"""Tests of harness/data: sources, cache, archives, datasets."""
