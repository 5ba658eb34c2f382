"""harness/strategy.py and harness/fsdp.py without processes: which modules become FSDP units, what
is refused before anything is built (naming the key), the padded validation sampler, ShardEMA's
arithmetic against ModelEMA's, and a sharded entry without its index being incomplete. The
multi-process behaviour is tests/test_fsdp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.checkpoint import format as fmt
from harness.config import ConfigError, FsdpConfig, TrainerConfig
from harness.data.sampler import ShardSampler
from harness.fsdp import check_initialisable, plan_units
from harness.models import MLP, SmallCNN, Tower
from harness.strategy import choose
from harness.utils.ema import ModelEMA, ShardEMA
from tests.sharding.parts import Scaled, ZeroHead


def meta(make):
    with torch.device("meta"):
        return make()


def test_auto_is_the_bare_module_at_one_process_and_ddp_above() -> None:
    assert choose("auto", 1).name == "none" and choose("ddp", 1).name == "none"
    assert choose("auto", 2).name == "ddp" and choose("fsdp", 1).name == "fsdp" and choose("fsdp", 4).sharded
    with pytest.raises(ConfigError, match="trainer.strategy='zero3' is not one of auto, ddp, fsdp"):
        choose("zero3", 2)


def test_units_by_class_name_children_first_and_never_the_root() -> None:
    model = meta(lambda: Tower(width=32, depth=3))
    units = plan_units(model, ["TowerBlock"], min_params=1)
    assert units == list(reversed(list(model.blocks)))
    assert plan_units(model, ["harness.models.TowerBlock"], min_params=1) == units  # the qualified name too
    linears = plan_units(model, ["Linear"], min_params=1)
    assert len(linears) == 5 and model not in linears


def test_units_by_size_take_each_module_whose_pending_parameters_reach_min_params() -> None:
    model = meta(lambda: Tower(width=64, depth=2))  # stem and each fc: 64 x 64 + 64 = 4,160; a norm 128
    units = plan_units(model, [], min_params=4_000)
    # each fc reaches it before its block does; what is left (norms, head: 906) never does
    assert units == [model.stem, model.blocks[0].fc, model.blocks[1].fc]
    assert plan_units(model, [], min_params=10**9) == []  # a small model: one unit, the root
    assert plan_units(meta(SmallCNN), [], min_params=1_000_000) == []


def test_an_unknown_wrap_class_is_refused_naming_the_classes_there_are() -> None:
    with pytest.raises(ConfigError, match=r"trainer.fsdp.wrap=\['Block'\]: no module of class Block in MLP; "
                                          r"its classes: Flatten, Linear, ReLU, Sequential"):
        plan_units(meta(MLP), ["Block"], min_params=1)


def test_a_module_that_cannot_reinitialise_its_own_tensors_is_refused_before_building() -> None:
    with pytest.raises(ConfigError, match=r"the root \(Scaled\) holds scale but has no reset_parameters\(\)"):
        check_initialisable(meta(Scaled))
    check_initialisable(meta(SmallCNN))  # conv, BatchNorm (its statistics too) and linear layers can


@pytest.mark.parametrize(("key", "message"), [
    ({"sync_bn": True}, "trainer.sync_bn=true with trainer.strategy=fsdp"),
    ({"amp": "fp16"}, "trainer.amp=fp16 with trainer.strategy=fsdp"),
    ({"channels_last": True}, "trainer.channels_last=true with trainer.strategy=fsdp"),
])
def test_what_fsdp_cannot_do_is_refused_at_start(key: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainerConfig(strategy="fsdp", **key)
    TrainerConfig(strategy="ddp", **{k: v for k, v in key.items() if k != "amp"})
    with pytest.raises(ConfigError, match="trainer.fsdp.min_params=0 must be >= 1"):
        FsdpConfig(min_params=0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_padded_validation_shards_are_equal_and_count_each_sample_once(world: int) -> None:
    shards = [ShardSampler(65, rank=r, world_size=world, pad=True) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-65 // world)
    real = [list(s)[: s.real] for s in shards]
    assert sorted(i for r in real for i in r) == list(range(65))  # the real part: every sample once
    assert all(list(s)[s.real:] == [0] * (len(s) - s.real) for s in shards)  # padding comes last
    assert real == [list(ShardSampler(65, rank=r, world_size=world)) for r in range(world)]  # = unpadded


def test_shard_ema_does_model_emas_arithmetic_and_swaps_its_weights_in_and_out() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    reference, sharded = ModelEMA(model, decay=0.9, tau=3), ShardEMA(model, decay=0.9, tau=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        reference.update(model)
        sharded.update(model)
    expected = reference.ema.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in sharded.state_dict()["ema"].items())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with sharded.evaluated(model) as evaluated:
        assert evaluated is model and torch.equal(model.head.weight, expected["head.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # its own weights are back


def test_a_sharded_entry_without_its_index_is_incomplete(tmp_path: Path) -> None:
    state = fmt.pack({"scheduler": {}, "progress": dict.fromkeys(fmt.PROGRESS_KEYS, 0)}, world_size=2, metrics={},
                     config="", sharded=("model", "optimizer"))
    fmt.write(state, tmp_path / fmt.STATE_FILE)
    with pytest.raises(fmt.CheckpointError, match=r"is incomplete: no shards/.metadata"):
        fmt.read(tmp_path / fmt.STATE_FILE)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".metadata").write_bytes(b"")
    assert fmt.sharded_parts(fmt.read(tmp_path / fmt.STATE_FILE)) == ["model", "optimizer"]


def test_the_python_api_refuses_an_unsharded_model_for_fsdp() -> None:
    with pytest.raises(ConfigError, match="the model must be sharded before its optimizer is made"):
        choose("fsdp", 2).wrap(nn.Linear(2, 2), torch.device("cpu"))


def test_the_toolbox_on_a_sharded_model_counts_it_whole_or_refuses_naming_export(capsys) -> None:
    from harness import dist as hdist
    from harness.utils.torch_utils import de_parallel, fuse_model, model_info, profile

    try:
        model = choose("fsdp", 1, FsdpConfig(min_params=1000)).build(SmallCNN, torch.device("cpu"))  # a 1-rank mesh
        assert model_info(model)[1] == sum(p.numel() for p in SmallCNN().parameters())  # global sizes
        assert de_parallel(model) is model
        with pytest.raises(TypeError, match=r"fuse_model needs the whole model, and this FSDPSmallCNN is sharded "
                                             r"\(trainer.strategy=fsdp\): export the checkpoint"):
            fuse_model(model)
        assert profile(torch.randn(2, 1, 8, 8), [model], n=1) == [None]
        assert "profile needs the whole model" in capsys.readouterr().out
    finally:
        hdist.teardown()


def test_initialisation_the_constructor_does_beyond_reset_parameters_is_refused() -> None:
    from harness import dist as hdist

    try:
        with pytest.raises(ConfigError, match=r"constructing ZeroHead initialises tensors in ways its modules' "
                                              r"reset_parameters\(\) do not \(5 in-place operations against 4; "
                                              r"operation 5 is zero_ in the constructor and nothing more "
                                              r"in the replay\)"):
            choose("fsdp", 1).build(ZeroHead, torch.device("cpu"))
        choose("fsdp", 1).build(lambda: Tower(width=32, depth=2), torch.device("cpu"))  # replays exactly
    finally:
        hdist.teardown()
