"""Run under torchrun by test_ema_early_stopping.py (2 gloo ranks) and tests/gpu (2 NCCL ranks): each rank
feeds EarlyStopping its own fitness sequence and writes what it decided to <out_dir>/rank<r>.json.

    python -m torch.distributed.run --standalone --nproc-per-node 2 early_stop_ranks.py OUT_DIR [gloo|nccl]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from harness.utils.torch_utils import EarlyStopping

# patience 2. Alone, rank 0 stops at epoch 3 (best 0.5 at epoch 1) and rank 1 at epoch 2 (best 0.9 at
# epoch 0); together both must stop at epoch 3 with rank 0's best.
SEQUENCES = {0: [0.1, 0.5, 0.4, 0.4, 0.3, 0.2], 1: [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]}


def main(out_dir: Path, backend: str) -> None:
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group(backend)
    rank = dist.get_rank()
    es = EarlyStopping(patience=2)
    stopped, possible = None, []
    for epoch, fitness in enumerate(SEQUENCES[rank]):
        stop = es(epoch, fitness)
        possible.append(es.possible_stop)
        if stop:
            stopped = epoch
            break
    dist.destroy_process_group()
    result = {"stopped": stopped, "best_epoch": es.best_epoch, "best_fitness": es.best_fitness,
              "possible": possible}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "gloo")
