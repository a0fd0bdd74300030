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
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import config as _schemas  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from . import methods as _methods  # noqa: F401  (each method registers its schema)
from .distributed import export_scheduler_env
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, ConfigError, RunError, fail

# The shipped option files live inside the package (peftrun/conf), so an installed wheel finds
# them; PEFTRUN_CONFIG_DIR replaces them, `--config-dir DIR` adds a folder of the user's own.
CONFIG_DIR = Path(os.environ.get("PEFTRUN_CONFIG_DIR", Path(__file__).resolve().parent / "conf"))
GROUPS = ("model", "task", "method", "trainer")


def _run_name(override_dirname: str) -> str:
    return override_dirname or "default"


if not OmegaConf.has_resolver("peftrun.run_name"):
    # A run folder that is a function of the command line: re-running a command resumes it.
    OmegaConf.register_new_resolver("peftrun.run_name", _run_name)


# --------------------------------------------------------------------------- composition errors
def _options(group: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    return sorted({p.stem for d in (CONFIG_DIR, *extra_dirs) for p in (Path(d) / group).glob("*.yaml")})


def user_config_dirs(argv: list[str]) -> list[Path]:
    """The folders of `--config-dir DIR` / `-cd DIR` (Hydra's flag: option files of the user's
    own, added to the groups), absolute; a folder that does not exist is a ConfigError."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            found.append(arg.split("=", 1)[1])
    dirs = [Path(d).expanduser().absolute() for d in found]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError("--config-dir", f"{d} is not a folder; give a folder of option files "
                                              f"laid out like the groups (e.g. my_conf/method/my_method.yaml)")
    return dirs


def compose_config(overrides: list[str], config_dirs: list[Path] = ()) -> DictConfig:
    """The config `peftrun OVERRIDES` runs with (the shipped options plus those in
    `config_dirs`); Hydra's exceptions pass through (explain_composition_error words them)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"] if config_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=[*overrides, *extra])
    finally:
        GlobalHydra.instance().clear()


def explain_composition_error(err: Exception, config_dirs: list[Path] = ()) -> ConfigError:
    """Turn Hydra/OmegaConf's multi-line composition errors into one ConfigError."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    full_text = text + "\n" + (str(cause) if cause else "")
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", full_text)
    if missing:
        group, option = missing.group(1), missing.group(2)
        return ConfigError(group, f"no option {option!r}; choose one of: {', '.join(_options(group, tuple(config_dirs)))}")
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
    if re.search(r"Value '[^']*' is not a valid bool", full_text):
        value = re.search(r"Value '([^']*)'", full_text).group(1)
        return ConfigError(key or "config", f"{value!r} is not a valid bool; give true or false")
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


# Keys whose value is a path, often of a run folder named by its overrides (`a=1,b=2`).
PATH_KEYS = ("trainer.init_from", "trainer.resume_from")


def quote_paths(argv: list[str]) -> list[str]:
    """The command line with the value of a PATH_KEYS override that holds `=` (which Hydra's
    grammar refuses unquoted) put in Hydra's quotes, so `trainer.init_from=outputs/a=1,b=2` is
    one path."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in PATH_KEYS and "=" in value and value[:1] not in ("'", '"') \
                and "'" not in value and not value.endswith("\\"):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def precheck(argv: list[str]) -> None:
    """Compose and validate the command line before Hydra runs it; exit 2 on bad input. Each
    result is kept for the job of the same config that Hydra then runs in this process."""
    from .validate import validate

    overrides, multirun, wants_help = split_cli(argv)
    try:
        config_dirs = user_config_dirs(argv)
    except ConfigError as e:
        fail(e)
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
        try:
            cfg = compose_config(own, config_dirs)
        except Exception as e:
            fail(explain_composition_error(e, config_dirs))
        if print_only:
            continue
        try:
            check_run_folder(line, multirun, config_dirs)
            validate(cfg, keep=True)
        except ConfigError as e:
            fail(e)


def run_folder(line: list[str], multirun: bool, config_dirs: list[Path] = ()) -> tuple[str, Path] | None:
    """(key, folder) of the run folder Hydra creates for this command line; None where it
    cannot be told here (Hydra then reports what it finds itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in config_dirs)}]"] if config_dirs else []
            cfg = compose(config_name="config", overrides=[*line, *extra], return_hydra_config=True)
        h = cfg.hydra
        return key, Path(h.sweep.dir) / str(h.sweep.subdir) if multirun else Path(h.run.dir)
    except Exception:  # e.g. options from --config-dir: fall back to the folder named on the line
        given = [o.split("=", 1)[1] for o in line if o.lstrip("+").startswith(f"{key}=")]
        return (key, Path(given[-1])) if given else None
    finally:
        GlobalHydra.instance().clear()


def check_run_folder(line: list[str], multirun: bool, config_dirs: list[Path] = ()) -> None:
    """The run folder must be a folder or creatable: a file there (or above it) is refused."""
    found = run_folder(line, multirun, config_dirs)
    if found is None:
        return
    key, folder = found
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == folder else f"is under {path}, a file"
                raise ConfigError(key, f"{folder} {what}, not a folder; choose another folder ({key}=...)")
            return


# --------------------------------------------------------------------------- the run
class SweepJobFailed(Exception):
    """A sweep's job failed: its reason is in its error.txt and on stderr; the other jobs go on."""


_failed_jobs: list[str] = []  # the folders of this process's sweep jobs that failed


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, (ConfigError, RunError)) else f"{type(err).__name__}: {text}"


def record_error(run_dir: Path, err: Exception) -> None:
    """error.txt in the run folder: the one line a failed run ends with (a sweep's summary lists it)."""
    try:
        (run_dir / "error.txt").write_text(one_line(err) + "\n")
    except OSError:
        pass


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> Any:
    """Hydra's job: one run. A sweep's job that fails is recorded and the sweep goes on."""
    try:
        return run_job(cfg)
    except SweepJobFailed:
        return None


def run_job(cfg: DictConfig) -> Any:
    from hydra.types import RunMode

    from .train.resume_point import check_resumable
    from .train.loop import train
    from .train.runlock import acquire_run_lock, release_run_lock
    from .validate import validated

    export_scheduler_env()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # every process shares one run folder
    sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN

    def stop(e: Exception) -> None:
        """error.txt, then: a sweep's job says one line and lets the sweep go on; a run exits."""
        if main_process:
            record_error(run_dir, e)
        if sweep_job:
            _failed_jobs.append(run_dir.name)
            print(f"peftrun: error: job {run_dir.name}: {one_line(e)}", file=sys.stderr, flush=True)
            raise SweepJobFailed(one_line(e))
        fail(e)

    def refuse(e: ConfigError, written: bool = False) -> None:
        release_run_lock(run_dir)
        if written:
            (run_dir / "config.yaml").unlink(missing_ok=True)
        if sweep_job:  # the job's folder keeps its error.txt for the sweep's summary
            stop(e)
        remove_if_empty(run_dir)
        fail(e)

    try:
        prepared = validated(cfg)  # the precheck's result when it ran in this process
    except ConfigError as e:
        refuse(e)
    try:
        try:
            if main_process:  # one run per folder, locked before anything is read or written there
                acquire_run_lock(run_dir)
            fresh = check_resumable(run_dir, cfg, main=main_process) is None
        except ConfigError as e:
            refuse(e)
        if main_process:
            write_config(run_dir, cfg)
            (run_dir / "error.txt").unlink(missing_ok=True)  # of an earlier try
        try:
            summary = train(cfg, run_dir, prepared=prepared)
        except ConfigError as e:  # found at set-up, before any weights (another world size, ...)
            refuse(e, written=fresh and main_process)
        except RunError as e:  # the run started and cannot go on (it diverged): exit 1
            stop(e)
        except Exception as e:  # a crash: recorded; in a sweep, the other jobs go on
            if not sweep_job:
                if main_process:
                    record_error(run_dir, e)
                raise
            traceback.print_exc()
            stop(e)
    finally:
        release_run_lock(run_dir)
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
    sys.argv[1:] = quote_paths(sys.argv[1:])  # Hydra's own entry point reads sys.argv too
    try:
        precheck(sys.argv[1:])
        run()
    except KeyboardInterrupt:  # outside the steps, or a second Ctrl-C: no traceback
        signal.signal(signal.SIGINT, exit_interrupted)
        print("peftrun: interrupted (Ctrl-C); run the same command again to resume from the newest "
              "checkpoint, if any", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        # The run is over (finished, stopped or aborted), its files written: a Ctrl-C from here
        # on, while the interpreter shuts down, ends the process at once instead of raising
        # KeyboardInterrupt inside some library's exit hook, which prints its traceback.
        signal.signal(signal.SIGINT, exit_interrupted)
    check_sweep()


def exit_interrupted(signum, frame) -> None:
    """SIGINT handler once the run is over: exit 130 now, after flushing what was printed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a write the signal cut short: flushing it again may refuse
            pass
    os._exit(EXIT_INTERRUPTED)


def check_sweep() -> None:
    """After a sweep: exit 1 when a job failed (each said why; the sweep's summary lists them)."""
    from .train import sweep

    done = sweep.last_sweep
    failed = done["failed"] if done else len(_failed_jobs)
    if failed:
        where = f" of {done['jobs']} sweep jobs failed or did not finish; see {done['files'][0]}" if done else \
            " sweep jobs failed"
        print(f"peftrun: error: {failed}{where}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
