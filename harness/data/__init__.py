"""Data: sources fetched into a verified cache (`cache.py`), archives unpacked safely (`archive.py`),
datasets that read the cached files (`datasets.py`), and the samplers that split global batches over
ranks (`sampler.py`)."""
