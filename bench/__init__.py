"""`make bench`: the harness against a hand-written PyTorch loop, side by side, with ratios.

data.py       the synthetic dataset both loops read; it also times their steps from inside
reference.py  the hand-written loop (torchrun-style environment, DDP only when world size > 1)
zero_first.py zero_first release latency, under torchrun
runs.py       the commands for each side, running one and reading what its ranks recorded
report.py     statistics, machine description, the table
run.py        the driver: `python -m bench.run` (alternating pairs, launcher, zero_first, JSON)
memory.py     `make bench-memory`: what a rank holds and how fast it steps, ddp vs fsdp (`python -m bench.memory`)
memory_rank.py  one rank of it: build through harness.strategy, train, count bytes, time a checkpoint
by_hand.py    the default job (`make train`) written by hand
job.py        `make bench-job`: `python -m harness.train` against by_hand.py, whole commands, with an A/A pair
peers/        `make bench-peers`: the reference, the harness (torchrun, its launcher), Lightning, Accelerate
              interleaved on one workload, with an A/A pair (`python -m bench.peers`; pip install -e '.[peers]')
"""
