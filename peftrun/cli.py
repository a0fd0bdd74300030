"""`peftrun`: compose the config -> validate -> build -> train -> report.

Bad input must end in one line naming the config key, exit code 2 and nothing written. Hydra
reports composition errors itself (several lines, exit 1) and creates the run folder before our
code runs, so the command line is composed and validated here first, through Hydra's compose
API, and only then handed to Hydra's own entry point. The checks themselves live in
peftrun/validate.py; the job Hydra then runs in this process takes their result instead of
validating again.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import config as _schemas  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from . import methods as _methods  # noqa: F401  (each method registers its schema)
from .distributed import export_scheduler_env
from .errors import ConfigError, fail

CONFIG_DIR = Path(os.environ.get("PEFTRUN_CONFIG_DIR", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("model", "task", "method", "trainer")


def _run_name(override_dirname: str) -> str:
    return override_dirname or "default"


if not OmegaConf.has_resolver("peftrun.run_name"):
    # A run folder that is a function of the command line: re-running a command resumes it.
    OmegaConf.register_new_resolver("peftrun.run_name", _run_name)


# --------------------------------------------------------------------------- composition errors
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def explain_composition_error(err: Exception) -> ConfigError:
    """Turn Hydra/OmegaConf's multi-line composition errors into one ConfigError."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    full_text = text + "\n" + (str(cause) if cause else "")
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", full_text)
    if missing:
        group, option = missing.group(1), missing.group(2)
        return ConfigError(group, f"no option {option!r}; choose one of: {', '.join(_options(group))}")
    key_match = re.search(r"full_key: ([\w.\[\]]+)", full_text)
    key = key_match.group(1) if key_match else None
    if re.search(r"Key '([^']+)' (?:is not in struct|not in ')", full_text):
        name = re.search(r"Key '([^']+)'", full_text).group(1)
        key = key or name
        group = key.split(".")[0]
        return ConfigError(key, f"unknown key; `peftrun {group}=... --cfg job` shows the keys of {group}")
    converted = re.search(r"Value '([^']*)'.*could not be converted to (\w+)", full_text)
    if converted:
        return ConfigError(key or "config", f"{converted.group(1)!r} is not a valid {converted.group(2)}")
    first = next((line for line in full_text.splitlines() if line.strip()), "invalid config")
    return ConfigError(key or "command line", first.strip())


def split_cli(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, is_multirun, wants_help) from a peftrun command line."""
    takes_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                   "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
    overrides, multirun, wants_help = [], False, False
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"):
            wants_help = True
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in takes_value:
            skip = arg not in ("--info", "-i") or (i + 1 < len(argv) and "=" not in argv[i + 1])
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun, wants_help


def candidate_override_lists(overrides: list[str]) -> list[list[str]]:
    """The command lines a sweep expands to, each sweep value tried once (not the product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base = []
    sweeps: list[tuple[int, list[str]]] = []
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            sweeps.append((i, values))
            base.append(f"{o.get_key_element()}={values[0]}")
        else:
            base.append(o.input_line)
    lines = [base]
    for i, values in sweeps:
        for v in values[1:]:
            line = list(base)
            line[i] = f"{parsed[i].get_key_element()}={v}"
            lines.append(line)
    return lines


def precheck(argv: list[str]) -> None:
    """Compose and validate the command line before Hydra runs it; exit 2 on bad input. Each
    result is kept for the job of the same config that Hydra then runs in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .validate import validate

    overrides, multirun, wants_help = split_cli(argv)
    if wants_help:
        return
    # --cfg / --info only print the config: check that it composes, not that it can run.
    print_only = any(a in ("--cfg", "-c", "--info", "-i") for a in argv)
    try:
        lines = candidate_override_lists(overrides) if multirun else [overrides]
    except Exception as e:  # a malformed override
        fail(ConfigError("command line", " ".join(str(e).split())))
    for line in lines:
        own = [o for o in line if not o.lstrip("+~").startswith("hydra")]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=own)
        except Exception as e:
            fail(explain_composition_error(e))
        finally:
            GlobalHydra.instance().clear()
        if print_only:
            continue
        try:
            validate(cfg, keep=True)
        except ConfigError as e:
            fail(e)


# --------------------------------------------------------------------------- the run
@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> Any:
    from .train.checkpoint import check_resumable
    from .train.loop import train
    from .validate import validated

    export_scheduler_env()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        prepared = validated(cfg)  # the precheck's result when it ran in this process
        fresh = check_resumable(run_dir, cfg) is None
    except ConfigError as e:
        remove_if_empty(run_dir)
        fail(e)
    if int(os.environ.get("RANK", "0")) == 0:  # every process shares one run folder
        write_config(run_dir, cfg)
    try:
        summary = train(cfg, run_dir, prepared=prepared)
    except ConfigError as e:  # found at set-up, before any weights (a batch too large, ...)
        if fresh:
            (run_dir / "config.yaml").unlink(missing_ok=True)
            remove_if_empty(run_dir)
        fail(e)
    return summary.get(summary["primary_metric"])


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, run_dir / "config.yaml")


def main() -> None:
    precheck(sys.argv[1:])
    run()


if __name__ == "__main__":
    main()
