"""Data: sources fetched into a verified cache (`cache.py`), datasets (`datasets.py`), and the
samplers that split global batches over ranks (`sampler.py`)."""
