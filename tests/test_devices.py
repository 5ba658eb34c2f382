"""Device grammar (pure): table of accepted forms, rejected forms with their messages, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.devices import (
    DeviceError,
    DeviceRequest,
    banner,
    check_mask_change,
    parse_device,
    place,
    plan_devices,
    worker_mask,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", DeviceRequest("auto")),
        (None, DeviceRequest("auto")),
        ("auto", DeviceRequest("auto")),
        (" AUTO ", DeviceRequest("auto")),
        ("cpu", DeviceRequest("cpu")),
        ("CPU", DeviceRequest("cpu")),
        ("cuda", DeviceRequest("cuda")),
        ("0", DeviceRequest("cuda", (0,))),
        (0, DeviceRequest("cuda", (0,))),
        ("0,1,2,3", DeviceRequest("cuda", (0, 1, 2, 3))),
        (" 0 , 1 ", DeviceRequest("cuda", (0, 1))),
        ("10", DeviceRequest("cuda", (10,))),  # multi-digit ids are ids, not characters (YOLOv5's bug)
        ("cuda:0", DeviceRequest("cuda", (0,))),
        ("CUDA:0,1", DeviceRequest("cuda", (0, 1))),
        ("cuda:0,cuda:1", DeviceRequest("cuda", (0, 1))),
        ([0, 1], DeviceRequest("cuda", (0, 1))),
        (("2", "3"), DeviceRequest("cuda", (2, 3))),
    ],
)
def test_accepted_forms(value: object, expected: DeviceRequest) -> None:
    assert parse_device(value) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("abc", ["'abc'", "not a GPU index", "valid:"]),
        ("0,,1", ["'0,,1'", "empty id"]),
        ("-1", ["'-1'", "not a GPU index"]),
        ("0,0", ["'0,0'", "more than once"]),
        ("cuda:", ["empty id"]),
        ("gpu0", ["not a GPU index"]),
        ("mps", ["'mps'", "valid:"]),
        ("1.5", ["not a GPU index"]),
        (True, ["not a device"]),
    ],
)
def test_rejected_forms_name_value_and_valid_forms(value: object, words: list[str]) -> None:
    with pytest.raises(DeviceError) as err:
        parse_device(value)
    for w in words:
        assert w in str(err.value)


@given(st.text(max_size=12))
def test_fuzz_parse_raises_only_device_error(text: str) -> None:
    try:
        req = parse_device(text)
    except DeviceError as exc:
        assert "device=" in str(exc)
        return
    assert req.kind in ("auto", "cpu", "cuda")
    if req.ids is not None:
        assert len(set(req.ids)) == len(req.ids) and all(i >= 0 for i in req.ids)


@given(st.lists(st.integers(0, 64), min_size=1, max_size=8, unique=True), st.booleans(), st.booleans())
def test_fuzz_id_lists_round_trip(ids: list[int], prefix: bool, spaces: bool) -> None:
    sep = " , " if spaces else ","
    text = ("cuda:" if prefix else "") + sep.join(map(str, ids))
    assert parse_device(text) == DeviceRequest("cuda", tuple(ids))


def test_auto_falls_back_to_cpu_without_gpus() -> None:
    plan = plan_devices(parse_device(""), visible_gpus=0, nproc=2)
    assert (plan.kind, plan.nproc, plan.cuda_visible_devices, plan.backend) == ("cpu", 2, None, "gloo")


def test_auto_takes_every_visible_gpu() -> None:
    plan = plan_devices(parse_device("auto"), visible_gpus=4)
    assert (plan.kind, plan.ids, plan.nproc, plan.cuda_visible_devices, plan.backend) == (
        "cuda", (0, 1, 2, 3), 4, "0,1,2,3", "nccl")


def test_gpu_count_sets_process_count() -> None:
    assert plan_devices(parse_device("1,3"), visible_gpus=4).nproc == 2
    assert plan_devices(parse_device("1,3"), visible_gpus=4, nproc=2).nproc == 2


def test_nproc_contradicting_gpu_list_is_an_error() -> None:
    with pytest.raises(DeviceError, match=r"dist.nproc=3 contradicts device='0,1'"):
        plan_devices(parse_device("0,1"), visible_gpus=2, nproc=3, raw="0,1")


def test_ids_beyond_visible_gpus() -> None:
    with pytest.raises(DeviceError, match=r"asks for GPU 10, but only 8 visible \(valid indices 0..7\)"):
        plan_devices(parse_device("10"), visible_gpus=8, raw="10")


def test_gpus_without_cuda() -> None:
    for value in ("0", "cuda", "cuda:0,1"):
        with pytest.raises(DeviceError, match="none is visible.*device=cpu"):
            plan_devices(parse_device(value), visible_gpus=0, raw=value)


def test_mask_maps_through_the_schedulers_mask() -> None:
    assert worker_mask([0, 1], None) == "0,1"
    assert worker_mask([0, 1], "4,5,6") == "4,5"
    assert worker_mask([2], "GPU-aaa,GPU-bbb,GPU-ccc") == "GPU-ccc"
    plan = plan_devices(parse_device("1"), visible_gpus=3, current_mask="4,5,6")
    assert plan.cuda_visible_devices == "5"


def test_mask_change_refused_once_cuda_is_initialised() -> None:
    check_mask_change("0,1", None, cuda_initialized=False)
    check_mask_change("0,1", "0,1", cuda_initialized=True)
    check_mask_change(None, "0", cuda_initialized=True)
    with pytest.raises(DeviceError, match="already initialised"):
        check_mask_change("1", "0,1", cuda_initialized=True)


def test_banner() -> None:
    cpu = banner(version="v1", torch_version="2.13.0", cpu_cores=2, ram_bytes=24 << 30)
    assert cpu == "harness v1 torch 2.13.0 CPU (2 cores, 24.0 GB RAM)"
    gpu = banner(version="v1", torch_version="2.13.0", gpus=[(0, "NVIDIA H100", 80 << 30)])
    assert gpu == "harness v1 torch 2.13.0 CUDA:0 (NVIDIA H100, 81920MiB)"


# --- place: one decision for every start shape ------------------------------------------------------
FACTS = {"visible_gpus": 8, "current_mask": None, "cuda_initialized": False}


@pytest.mark.parametrize(("device", "shape", "facts", "expected"), [
    # the launcher: its plan for the workers; one process trains here with the plan's mask
    ("0,1", "launcher", {}, (2, "0,1", None, None)),
    ("0,1", "launcher", {"visible_gpus": 2, "current_mask": "4,5"}, (2, "4,5", None, None)),  # a scheduler's mask
    ("3", "launcher", {}, (1, "3", "3", 0)),
    ("cpu", "launcher", {"nproc": 4}, (4, None, None, None)),
    ("", "launcher", {"visible_gpus": 0}, (1, None, None, None)),
    # a process our launcher started: the mask is set already; visible GPU LOCAL_RANK
    ("0,1", "launched", {"visible_gpus": 2, "local_rank": 1, "local_world_size": 2}, (2, None, None, 1)),
    ("3", "launched", {"visible_gpus": 1}, (1, None, None, 0)),
    # torchrun / srun: explicit ids are pinned here, one per local rank, through the scheduler's mask
    ("2,3", "worker", {"local_rank": 1, "local_world_size": 2}, (2, "2,3", "2,3", 1)),
    ("0,1", "worker", {"visible_gpus": 4, "current_mask": "4,5,6,7", "local_rank": 0, "local_world_size": 2},
     (2, "4,5", "4,5", 0)),
    ("", "worker", {"local_rank": 5, "local_world_size": 8}, (8, None, None, 5)),
    # srun --gpus-per-task=1: each task sees its own GPU only, and uses it
    ("cuda", "worker", {"visible_gpus": 1, "local_rank": 3, "local_world_size": 4}, (4, None, None, 0)),
    ("", "worker", {"visible_gpus": 0, "local_rank": 1, "local_world_size": 2}, (2, None, None, None)),
    ("cpu", "worker", {"local_rank": 1, "local_world_size": 2}, (2, None, None, None)),
])
def test_place_decides_every_start_shape(device: str, shape: str, facts: dict, expected: tuple) -> None:
    p = place(device, shape=shape, **{**FACTS, **facts})  # type: ignore[arg-type]
    assert (p.plan.nproc, p.plan.cuda_visible_devices, p.mask, p.index) == expected
    assert p.cuda == (expected[3] is not None)


def test_place_refuses_what_cannot_be_met() -> None:
    with pytest.raises(DeviceError, match=r"device='cuda' asks for CUDA GPUs, but none is visible"):
        place("cuda", shape="worker", **{**FACTS, "visible_gpus": 0})
    with pytest.raises(DeviceError, match=r"asks for GPU 2, but only 2 visible"):
        place("0,2", shape="worker", local_world_size=2, **{**FACTS, "visible_gpus": 2})
    with pytest.raises(DeviceError, match=r"CUDA is already initialised .* cannot change to '1'"):
        place("1", shape="worker", **{**FACTS, "cuda_initialized": True, "current_mask": "0,1"})
    with pytest.raises(DeviceError, match=r"dist.nproc=2 contradicts device='0'"):
        place("0", shape="launcher", nproc=2, **FACTS)
