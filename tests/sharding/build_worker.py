"""A torchrun worker: build models through the fsdp strategy and compare them with a plain build.

Prints one JSON line per model from rank 0: whether the gathered initial weights equal a plain
construction's with the same seed (bit for bit), each rank's and the whole model's parameter
count, and that the random generator ends where a plain construction leaves it.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist

from harness import dist as hdist
from harness.config import FsdpConfig
from harness.models import SmallCNN, Tower
from harness.runtime import seed_everything
from harness.strategy import choose


def check(name: str, make, fsdp: FsdpConfig) -> dict:
    seed_everything(7)
    plain = make()
    plain_next = torch.rand(1)
    seed_everything(7)
    sharded = choose("fsdp", dist.get_world_size(), fsdp).build(make, torch.device("cpu"))
    sharded_next = torch.rand(1)
    full = sharded.state_dict()
    equal = all(torch.equal(getattr(full[k], "full_tensor", lambda v=full[k]: v)(), v)
                for k, v in plain.state_dict().items())
    local = [None] * dist.get_world_size()
    dist.all_gather_object(local, sum(p.to_local().numel() for p in sharded.parameters()))
    return {"model": name, "equal": equal, "local": local, "total": sum(p.numel() for p in plain.parameters()),
            "rng_after": torch.equal(plain_next, sharded_next)}


def main() -> None:
    dist.init_process_group("gloo")
    rows = [check("SmallCNN", SmallCNN, FsdpConfig(min_params=1000)),
            check("Tower", lambda: Tower(width=256, depth=4), FsdpConfig(wrap=["TowerBlock"])),
            check("Tower-by-size", lambda: Tower(width=256, depth=4), FsdpConfig())]
    if dist.get_rank() == 0:
        for row in rows:
            print(json.dumps(row), flush=True)
    gc.collect()  # the sharded models' cycles hold the group: collect them before it goes (harness/job.py)
    hdist.meet()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
