"""Every config under conf/ composes and validates; the schema rejects what it should."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from harness.config import (
    HANDED,
    Config,
    ConfigError,
    compose,
    conf_dir,
    hand_over,
    handed,
    quote_device_override,
    to_config,
)

CONF = conf_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def _compose(overrides: list[str]) -> Config:
    return to_config(compose(overrides))


def _options() -> list[str]:
    return [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_conf_is_the_top_level_folder() -> None:
    assert CONF == Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("option", _options())
def test_every_config_file_composes(option: str) -> None:
    cfg = _compose([option])
    assert cfg.data.batch_size > 0 and cfg.model is not None and cfg.optim is not None


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_opens_with_the_command_that_uses_it(path: Path) -> None:
    head = path.read_text().splitlines()[:3]
    if path.parent.name in ("model", "data", "optim", "trainer", "dist", "experiment") or path.name == "config.yaml":
        assert any("python -m harness.train" in line for line in head), head


def test_defaults() -> None:
    cfg = _compose([])
    assert cfg.device == "" and cfg.seed == 0 and cfg.dist.timeout == 600.0 and not cfg.trainer.deterministic
    assert cfg.data.url.startswith("file://") and len(cfg.data.sha256) == 64


def test_overrides() -> None:
    cfg = _compose(["trainer.epochs=2", "data.batch_size=32", "seed=7", "dist.timeout=30",
                    "trainer.deterministic=true", "device=[0,1]"])
    assert (cfg.trainer.epochs, cfg.data.batch_size, cfg.seed, cfg.dist.timeout) == (2, 32, 7, 30.0)
    assert cfg.trainer.deterministic and list(cfg.device) == [0, 1]


def test_unknown_key_and_wrong_type_name_the_key() -> None:
    """compose's ConfigError carries Hydra's message and its cause's (which names the key)."""
    with pytest.raises(ConfigError) as err:
        _compose(["trainer.foo=1"])
    assert "trainer.foo" in str(err.value) and "Key 'foo' not in 'TrainerConfig'" in str(err.value)
    assert isinstance(err.value.__cause__, ConfigCompositionException)
    with pytest.raises(ConfigError) as err:
        _compose(["trainer.epochs=abc"])
    assert "trainer.epochs" in str(err.value) and isinstance(err.value.__cause__.__cause__, ValidationError)
    with pytest.raises(ConfigError, match="Could not find 'model/nope'"):
        _compose(["model=nope"])


@pytest.mark.parametrize(("override", "words"), [
    ("dist.backend=mpi", "dist.backend='mpi' is not one of auto, gloo, nccl"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("trainer.accumulate=0", "trainer.accumulate=0 must be >= 1"),
    ("dist.timeout=0", "dist.timeout=0.0 must be > 0"),
    ("dist.nproc=-1", "dist.nproc=-1 must be >= 0"),
])
def test_cross_field_checks(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _compose([override])


def test_device_quoting_outside_multirun() -> None:
    assert quote_device_override(["device=0,1", "x=1"]) == ["device='0,1'", "x=1"]
    assert quote_device_override(["device=cuda:0,1"]) == ["device='cuda:0,1'"]
    assert quote_device_override(["device='0,1'"]) == ["device='0,1'"]
    assert quote_device_override(["device=[0,1]"]) == ["device=[0,1]"]
    assert quote_device_override(["device=0"]) == ["device=0"]
    assert quote_device_override(["-m", "device=0,1"]) == ["-m", "device=0,1"]  # a sweep there
    assert _compose(quote_device_override(["device=0,1"])).device == "0,1"


@pytest.mark.parametrize("option", _options())
def test_every_config_file_is_instantiated_not_only_composed(option: str) -> None:
    """Model, optimizer, loss and metric built from each file (a misspelt _target_ or argument fails
    here); the dataset too where it is the shipped one (mnist, cifar10 and imagefolder are built from
    generated files served on 127.0.0.1 in tests/data/test_datasets.py)."""
    import torch
    from hydra.utils import instantiate

    from harness.data.cache import fetch_configured

    cfg = compose([option])
    c = to_config(cfg)
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module) and sum(p.numel() for p in model.parameters()) > 0
    optimizer = instantiate(cfg.optim, params=model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert callable(instantiate(cfg.loss)) and callable(instantiate(cfg.metric))
    if c.data.url.startswith("file://"):
        dataset = instantiate(cfg.data.dataset, path=fetch_configured(c.data, progress=False), split="val")
        x, _ = dataset[0]
        out = model(x.unsqueeze(0))
        assert out.shape[-1] == 10  # the shipped dataset through the configured model


def test_the_launchers_composition_reaches_its_workers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of our launcher take its composed config (no second composition at start-up): the
    same values, schema and unresolved interpolations as composing the overrides again."""
    overrides = ["model=small_cnn", "trainer.epochs=3", "data.url=''", "+data.dataset.extra=1"]
    cfg = compose(overrides)
    value = hand_over(cfg)
    assert len(value) < 64_000  # one environment variable, far below the kernel's 128 KiB per string
    got = handed({HANDED: value, "HARNESS_LAUNCHED": "1"})
    assert got is not None and got == cfg and OmegaConf.to_yaml(got) == OmegaConf.to_yaml(cfg)
    monkeypatch.setenv("HARNESS_CACHE", "/elsewhere")  # interpolations resolve in the worker, as before
    assert to_config(got) == to_config(compose(overrides)) and to_config(got).data.root == "/elsewhere"
    assert handed({HANDED: value}) is None  # only our launcher's workers (torchrun, srun: compose)
    assert handed({"HARNESS_LAUNCHED": "1"}) is None


def test_no_config_file_sets_hydra_mode() -> None:
    """The launcher skips Hydra's hydra.mode probe (a second composition, 0.15-0.2 s) unless the
    command line brings other configs or sets it: that holds only while conf/ never sets it."""
    for path in CONF.rglob("*.yaml"):
        cfg = OmegaConf.load(path)
        assert OmegaConf.select(cfg, "hydra.mode") is None and "mode:" not in path.read_text(), path
