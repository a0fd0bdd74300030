"""Every shipped config composes, names what it should, and is guarded by its schema.

The options are discovered from peftrun/conf/<group>/*.yaml, so a new file is covered without editing
this module. Fast: composition only, no model is built.
"""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF, compose_config

NAMED_GROUPS = ("model", "task", "method")  # groups whose config carries a `name`
EXPECTED_GROUPS = {"model", "task", "method", "trainer", "experiment"}
REFUSED = (HydraException, OmegaConfBaseException)


def _groups() -> list[str]:
    return sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.endswith("_schema"))


OPTIONS = [(g, o) for g in _groups() for o in _options(g)]
OPTION_IDS = [f"{g}={o}" for g, o in OPTIONS]


def _root_defaults() -> dict[str, str | None]:
    """`{group: option}` from the defaults list of peftrun/conf/config.yaml."""
    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if not key.startswith("override"):
                out[key] = value
    return out


def _experiment_overrides(option: str) -> dict[str, str]:
    """`{group: option}` an experiment selects through `override /group: option`."""
    data = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{option}.yaml"))
    out = {}
    for entry in data.get("defaults", []) or []:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if key.startswith("override /"):
                out[key.removeprefix("override /")] = value
    return out


def test_the_expected_groups_ship_options():
    assert EXPECTED_GROUPS <= set(_groups())
    for group in EXPECTED_GROUPS:
        assert _options(group), f"peftrun/conf/{group}/ has no option"
    # the defaults shipped with the app
    assert {"tiny", "toy", "lora"} <= {o for _, o in OPTIONS}


def test_schemas_live_in_the_config_store_not_on_disk():
    assert not list(CONF.rglob("*_schema.yaml"))


@pytest.mark.parametrize("group,option", OPTIONS, ids=OPTION_IDS)
def test_every_option_composes_with_the_expected_names(group, option):
    cfg = compose_config(f"{group}={option}")
    # nothing left mandatory ("???") and every interpolation resolves
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)

    expected = {g: o for g, o in _root_defaults().items() if g in NAMED_GROUPS}
    if group == "experiment":
        expected.update({g: o for g, o in _experiment_overrides(option).items() if g in NAMED_GROUPS})
    elif group in NAMED_GROUPS:
        expected[group] = option
    for g, name in expected.items():
        assert cfg[g].name == name, f"{group}={option}: {g}.name is {cfg[g].name!r}, expected {name!r}"

    # every group's node is typed by a schema, so typos and wrong types are refused
    for g in ("model", "task", "method", "trainer"):
        assert dataclasses.is_dataclass(OmegaConf.get_type(cfg[g])), f"{group}={option}: {g} has no schema"


@pytest.mark.parametrize("option", _options("method"))
def test_every_method_option_names_a_registered_method(option):
    from peftrun.methods import METHODS

    assert compose_config(f"method={option}").method.name in METHODS


@pytest.mark.parametrize("option", _options("task"))
def test_every_task_option_names_a_registered_task(option):
    from peftrun.tasks import TASKS

    assert compose_config(f"task={option}").task.name in TASKS


@pytest.mark.parametrize("group,option", [(g, o) for g, o in OPTIONS if g != "experiment"],
                         ids=[i for i in OPTION_IDS if not i.startswith("experiment=")])
def test_every_option_refuses_an_unknown_key(group, option):
    with pytest.raises(REFUSED):
        compose_config(f"{group}={option}", f"{group}.no_such_key=1")


@pytest.mark.parametrize("override", [
    "method.nope=1",
    "model.nope=1",
    "task.nope=1",
    "trainer.nope=1",
    "model.build.nope=1",
    "nope=1",
])
def test_unknown_key_is_refused(override):
    with pytest.raises(REFUSED):
        compose_config(override)


@pytest.mark.parametrize("override", [
    "method.r=abc",
    "method.alpha=big",
    "trainer.lr=fast",
    "trainer.max_steps=1.5",
    "trainer.progress=maybe",
    "model.gradient_checkpointing=maybe",
    "model.build.hidden_size=wide",
    "task.num_train=many",
    "trainer.adam_betas=0.9",
])
def test_wrong_type_is_refused(override):
    with pytest.raises(REFUSED):
        compose_config(override)


def test_overrides_reach_the_composed_config():
    cfg = compose_config("method.r=4", "trainer.lr=1e-4", "model=tiny_gpt2", "task=jsonl")
    assert (cfg.method.r, cfg.trainer.lr, cfg.model.name, cfg.task.name) == (4, 1e-4, "tiny_gpt2", "jsonl")
    assert isinstance(cfg.method.r, int) and isinstance(cfg.trainer.lr, float)


def test_a_config_error_survives_pickling():
    # A run in a worker process (bench_quality.py's pool) hands its error back pickled.
    import pickle

    from peftrun.errors import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("method.r", "must be at least 1; set method.r=8")))
    assert isinstance(err, ConfigError)
    assert (err.key, err.message, str(err)) == ("method.r", "must be at least 1; set method.r=8",
                                                "method.r: must be at least 1; set method.r=8")
