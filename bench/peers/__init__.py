"""`make bench-peers`: the harness next to other frameworks' loops on one workload, in one interleaved run.

__main__.py        the driver: `python -m bench.peers` (rounds, rotation, table, JSON lines)
stats.py           paired ratios and differences against the reference, the table, the JSON lines
common.py          what the peer loops share with bench/reference.py (batches, schedule, evaluation, save)
lightning_loop.py  the reference's work as a LightningModule under Lightning's Trainer
accelerate_loop.py the reference's work under Hugging Face Accelerate

The peers are an optional extra, never a dependency of the harness: pip install -e '.[peers]'.
"""
