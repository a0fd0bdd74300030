"""Checkpoints: one folder per step under <run>/checkpoints, written under a temporary name and
renamed, so a killed run never leaves a half checkpoint. The newest complete one resumes."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ..distributed import load_optimizer_state, optimizer_state
from ..errors import ConfigError
from ..methods import ADAPTER_WEIGHTS, replace_dir, save_adapter

if TYPE_CHECKING:
    from .state import Run, TrainState

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS = "trainer_state.json"

# Keys a resumed run may change without changing what it computes.
RESUME_SAFE_KEYS = {
    "trainer.progress", "trainer.log_every", "trainer.save_every", "trainer.save_total_limit",
    "trainer.eval_batch_size", "trainer.num_processes",
}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_partial(run_dir: Path) -> None:
    """Remove what a killed run left half-written (never a complete checkpoint)."""
    for leftover in (run_dir / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: TrainState, run: Run, keep: int, protect: frozenset[str] = frozenset()) -> Path:
    """Save adapter, optimizer, scheduler, progress and config (main process) and every
    process's RNG into a temporary folder, then rename it into place and prune old ones."""
    acc = run.accelerator
    root = run_dir / CHECKPOINTS
    tmp = root / f".tmp-step-{state.step:08d}"
    final = root / f"step-{state.step:08d}"
    # Every process takes part in gathering sharded (FSDP) tensors; the main one writes.
    tensors = run.adapter.state_dict()
    optimizer = optimizer_state(acc, run.model, run.optimizer)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(run.adapter, tmp / "adapter", tensors=tensors)
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / PROGRESS).write_text(json.dumps(state.progress(), indent=2))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                if old.name not in protect:
                    shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, state: TrainState, run: Run, process_index: int) -> None:
    run.adapter.load_state_dict(load_file(str(folder / "adapter" / ADAPTER_WEIGHTS)))
    saved_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    run.adapter.load_extra_state(saved_cfg.get("state", {}))
    load_optimizer_state(run.accelerator, run.model, run.optimizer, torch.load(folder / "optimizer.pt", weights_only=False))
    run.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    state.load_progress(json.loads((folder / PROGRESS).read_text()))
    rng = folder / f"rng-{process_index}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))


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


def check_resumable(run_dir: Path, cfg) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Refuses a folder whose
    checkpoints come from a run with another config."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    old = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    diffs = config_differences(old, new)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(
            "hydra.run.dir",
            f"{run_dir} holds checkpoints of a run with another config ({shown}); "
            f"run in another folder (hydra.run.dir=...) or delete {run_dir / CHECKPOINTS}",
        )
    return ckpt
