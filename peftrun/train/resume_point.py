"""Which checkpoint a run resumes from: the newest complete one of its folder (newer incomplete
ones set aside), of a run with the same config; or `trainer.resume_from=CHECKPOINT`, a chosen one
(of this run folder or another; complete, same config). The run folder's checkpoints after a
chosen one are set aside as `abandoned-step-N` and `resumed_from.json` records the choice, so
running the same command again resumes from the newest checkpoint saved since, as any run does."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ConfigError
from ..methods import ADAPTER_WEIGHTS, replace_dir
from .checkpoint import CHECKPOINTS, MANIFEST, PROGRESS, STEP_DIR, check_checkpoint, checkpoint_dirs, is_legacy, set_aside

# Keys a resumed run may change without changing what it computes.
RESUME_SAFE_KEYS = {
    "trainer.progress", "trainer.log_every", "trainer.save_every", "trainer.save_total_limit",
    "trainer.eval_batch_size", "trainer.num_processes", "trainer.max_nonfinite_skips", "trainer.report_to",
    "trainer.resume_from",  # where a run resumes from does not change what it computes
}
RESUMED_FROM = "resumed_from.json"  # in a run folder: the trainer.resume_from it continued from


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        path = f"{prefix}{k}"
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".")
        elif a != b and path not in RESUME_SAFE_KEYS:
            out.append(f"{path}: {a} -> {b}")
    return out


def check_resumable(run_dir: Path, cfg, main: bool = True) -> Path | None:
    """The checkpoint to resume from (the newest complete one, or trainer.resume_from), or None
    for a fresh start. `main`: the process that holds the run folder's lock sets newer incomplete
    checkpoints aside, with a one-line warning each. Refuses (ConfigError) a folder whose
    checkpoints are all incomplete, were written by an older peftrun in pickle format, or come
    from a run with another config."""
    chosen = OmegaConf.select(cfg, "trainer.resume_from", default=None)
    if chosen:
        return chosen_checkpoint(run_dir, cfg, Path(chosen).expanduser().absolute(), main)
    return newest_checkpoint(run_dir, cfg, main)


def newest_checkpoint(run_dir: Path, cfg, main: bool = True) -> Path | None:
    """The newest complete checkpoint of `run_dir` (see `check_resumable`)."""
    root = run_dir / CHECKPOINTS
    bad: list[tuple[Path, str]] = []
    chosen = None
    for folder in reversed(checkpoint_dirs(run_dir)):
        if is_legacy(folder):
            raise ConfigError(
                "hydra.run.dir",
                f"{folder} was written by an older peftrun in pickle format, which is never loaded "
                f"(a pickle can run code); delete {root} to start the run over, or run in another folder",
            )
        problem = check_checkpoint(folder)
        if problem is None:
            chosen = folder
            break
        bad.append((folder, problem))
    if chosen is None and bad:
        more = f" (and {len(bad) - 1} more incomplete)" if len(bad) > 1 else ""
        raise ConfigError(
            "hydra.run.dir",
            f"no complete checkpoint in {root}: {bad[0][0].name}: {bad[0][1]}{more}; delete {root} "
            f"to start the run over, or run in another folder",
        )
    if chosen is None:
        return None
    if main:
        for folder, problem in bad:
            try:
                moved = set_aside(folder)
            except OSError:  # another process of the run moved it already
                continue
            print(f"peftrun: warning: checkpoint {folder.name} is incomplete ({problem}); set aside as "
                  f"{moved.name}, resuming from {chosen.name}", file=sys.stderr, flush=True)
    try:
        old = OmegaConf.to_container(OmegaConf.load(chosen / "config.yaml"), resolve=True)
    except Exception as e:
        raise ConfigError("hydra.run.dir", f"{chosen / 'config.yaml'} does not load ({type(e).__name__}); "
                                           f"delete {root} to start the run over") from e
    new = OmegaConf.to_container(cfg, resolve=True)
    diffs = config_differences(old, new)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(
            "hydra.run.dir",
            f"{run_dir} holds checkpoints of a run with another config ({shown}); "
            f"run in another folder (hydra.run.dir=...) or delete {run_dir / CHECKPOINTS}",
        )
    return chosen


# ------------------------------------------------------------------------------ trainer.resume_from
def checkpoint_step(folder: Path) -> int:
    """The step a (complete) checkpoint was saved at."""
    return int(json.loads((folder / PROGRESS).read_text())["step"])


def _resumed_from(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RESUMED_FROM).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_chosen(folder: Path, cfg) -> None:
    """`folder` (trainer.resume_from) is a complete checkpoint of a run with this config."""
    key = "trainer.resume_from"
    if not folder.is_dir():
        raise ConfigError(key, f"{folder} is not a folder; give a checkpoint folder, e.g. "
                               f"outputs/RUN/{CHECKPOINTS}/step-00000100")
    if not (folder / MANIFEST).exists() and (folder / CHECKPOINTS).is_dir():
        raise ConfigError(key, f"{folder} is a run folder; give one of its checkpoints "
                               f"({folder / CHECKPOINTS}/step-N), or leave {key} out to resume from the newest")
    if is_legacy(folder):
        raise ConfigError(key, f"{folder} was written by an older peftrun in pickle format, which is never "
                               f"loaded (a pickle can run code); choose another checkpoint")
    problem = check_checkpoint(folder)
    if problem is not None:
        raise ConfigError(key, f"{folder} is not a complete checkpoint ({problem}); choose another one "
                               f"(outputs/RUN/{CHECKPOINTS}/step-N)")
    try:
        old = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    except Exception as e:
        raise ConfigError(key, f"{folder / 'config.yaml'} does not load ({type(e).__name__}); choose another "
                               f"checkpoint") from e
    diffs = config_differences(old, OmegaConf.to_container(cfg, resolve=True))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(key, f"{folder} is a checkpoint of a run with another config ({shown}); resume it "
                               f"with that config, or start a new run from its adapter with "
                               f"trainer.init_from={folder}")


def chosen_checkpoint(run_dir: Path, cfg, folder: Path, main: bool = True) -> Path:
    """The checkpoint a run with trainer.resume_from=`folder` resumes from: `folder`, or, once the
    run has continued from it (`resumed_from.json`), the newest checkpoint it saved since."""
    if _resumed_from(run_dir) == str(folder):
        newest = newest_checkpoint(run_dir, cfg, main)
        marked = json.loads((run_dir / RESUMED_FROM).read_text()).get("step", -1)
        if newest is not None and checkpoint_step(newest) > marked:
            return newest
    check_chosen(folder, cfg)
    return folder


def adopt_resume_point(run_dir: Path, cfg, resume_from: Path | None) -> None:
    """Main process, once the run folder is locked: when the run resumes from its
    trainer.resume_from for the first time, set aside the run folder's checkpoints after it
    (`abandoned-step-N`), bring along the best adapter of the chosen run where it predates the
    checkpoint, and record the choice (`resumed_from.json`)."""
    chosen = OmegaConf.select(cfg, "trainer.resume_from", default=None)
    if not chosen or resume_from is None:
        return
    folder = Path(chosen).expanduser().absolute()
    if resume_from != folder or _resumed_from(run_dir) == str(folder):
        return  # resuming from what the run saved since, or the choice is recorded already
    step = checkpoint_step(folder)
    for own in checkpoint_dirs(run_dir):
        if own.resolve() == folder.resolve():
            continue
        try:
            later = checkpoint_step(own) > step
        except (OSError, ValueError, KeyError, TypeError):  # incomplete: not resumable anyway
            later = int(STEP_DIR.match(own.name).group(1)) > step
        if later:
            target = set_aside(own, "abandoned")
            print(f"peftrun: warning: checkpoint {own.name} is after trainer.resume_from ({folder.name}); set "
                  f"aside as {target.name}", file=sys.stderr, flush=True)
    source_best, best = folder.parent.parent / "best", run_dir / "best"
    if folder.parent.name == CHECKPOINTS and source_best.resolve() != best.resolve() and \
            (source_best / ADAPTER_WEIGHTS).is_file():
        try:
            best_step = json.loads((source_best / "adapter_config.json").read_text()).get("step", step + 1)
        except (OSError, ValueError):
            best_step = step + 1
        if best_step <= step:
            tmp = run_dir / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source_best, tmp)
            replace_dir(tmp, best)
    tmp = run_dir / f".{RESUMED_FROM}.tmp"
    tmp.write_text(json.dumps({"checkpoint": str(folder), "step": step}, indent=2))
    os.replace(tmp, run_dir / RESUMED_FROM)
