"""Checkpoints: one folder per step under <run>/checkpoints, written under a temporary name and
renamed, so a killed run never leaves a half checkpoint.

A checkpoint holds no pickle: tensors are safetensors, everything else JSON (`save_state` /
`load_state`), so loading a run folder copied from someone else cannot run code. Its last file,
written inside the temporary folder just before the rename, is `manifest.json`: every other file
with its size and SHA-256. A checkpoint is trusted only when the manifest is there and every file
matches it. A run resumes from the newest complete checkpoint; newer incomplete ones (a truncated
or missing file, a disk that filled up) are set aside as `bad-step-N` with a one-line warning; when
none is complete the run stops with one line (exit 2). Checkpoints of older peftrun versions
(pickle `.pt` files, no manifest) are refused, never unpickled.

Which checkpoint a run resumes from (the newest complete one, or trainer.resume_from) is
resume_point.py's.

No tensor that is not finite is ever written (checkpoint, `best/` or `adapter/`): the run stops
instead (`check_finite_tensors`), keeping the last finite checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..distributed import load_optimizer_state, optimizer_state
from ..errors import ConfigError, RunError
from ..methods import ADAPTER_WEIGHTS, replace_dir, save_adapter

if TYPE_CHECKING:
    from .state import Run, TrainState

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
PROGRESS = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: pickle files (.pt), no manifest — refused
LEGACY_FILES = ("optimizer.pt", "scheduler.pt", "rng-0.pt")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders (complete or not: see `check_checkpoint`), oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_partial(run_dir: Path) -> None:
    """Remove what a killed run left half-written (never a complete checkpoint). Only the
    holder of the run folder's lock calls this (train/runlock.py)."""
    for leftover in (run_dir / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in list(run_dir.glob(".tmp-*")) + list(run_dir.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------------ state files
def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """`obj` as JSON, its tensors moved into `tensors` (named t0, t1, ...)."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot store {type(obj).__name__} (at {where})")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"unexpected object with keys {sorted(obj)[:3]}")
    return obj


def save_state(obj: Any, folder: Path, name: str) -> None:
    """`obj` (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as
    `name.json`, and its tensors as `name.safetensors` when it has any."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, tensors, name)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": encoded}))


def load_state(folder: Path, name: str) -> Any:
    data = json.loads((folder / f"{name}.json").read_text())
    weights = folder / f"{name}.safetensors"
    tensors = load_file(str(weights)) if weights.exists() else {}
    return _decode(data["state"], tensors)


# ------------------------------------------------------------------------------ the manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file of `folder` with its size and SHA-256 (flushed to disk first), as the
    folder's last file."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


_checked: dict[tuple, str | None] = {}  # (folder, manifest stamp) -> problem; hashing once per process


def is_legacy(folder: Path) -> bool:
    """Written by an older peftrun: pickle files and no manifest."""
    return not (folder / MANIFEST).exists() and any((folder / name).exists() for name in LEGACY_FILES)


def check_checkpoint(folder: Path) -> str | None:
    """None when `folder` is complete (its manifest is there and every file in it matches),
    else what is wrong, in a few words."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the checkpoint was not finished)"
    try:  # every file's identity, size and time: a file changed since it was hashed is hashed again
        stamp = (str(folder.resolve()), *sorted((str(p), s.st_ino, s.st_size, s.st_mtime_ns)
                                                for p in folder.rglob("*") if (s := p.stat()) and p.is_file()))
    except OSError:  # a file vanished meanwhile
        return f"files of {folder.name} vanished while it was checked"
    if stamp not in _checked:
        _checked[stamp] = _check(folder, manifest)
    return _checked[stamp]


def _check(folder: Path, manifest: Path) -> str | None:
    try:
        files = json.loads(manifest.read_text())["files"]
        assert isinstance(files, dict) and files
    except Exception:
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"{MANIFEST} names a file outside the checkpoint ({name})"
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return f"{name} is missing"
        if size != expected.get("size"):
            return f"{name} has {size} bytes, {expected.get('size')} expected"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match its SHA-256"
    required = [f"adapter/{ADAPTER_WEIGHTS}", "optimizer.json", "scheduler.json", PROGRESS, "config.yaml"]
    missing = [name for name in required if name not in files]
    if missing:
        return f"{MANIFEST} does not list {missing[0]}"
    return None


def set_aside(folder: Path, prefix: str = "bad") -> Path:
    """Rename a checkpoint out of the way as `<prefix>-<name>` (kept for inspection, never
    resumed): an incomplete one ("bad"), or one after a chosen resume point ("abandoned")."""
    target = folder.with_name(f"{prefix}-{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{prefix}-{folder.name}-{n}")
    os.replace(folder, target)
    return target


# ------------------------------------------------------------------------------ RNG
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


# ------------------------------------------------------------------------------ finiteness
def nonfinite_names(tensors: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors (nested in dicts and lists too) holding NaN or inf."""
    bad = []
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    for name, value in items:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(f"{prefix}{name}")
        elif isinstance(value, (Mapping, list, tuple)):
            bad += nonfinite_names(value, f"{prefix}{name}.")
    return bad


def divergence_error(cfg, step: int, what: str, run_dir: Path | None = None) -> RunError:
    """The one line a diverged run stops with: the step, what was not finite, what to change."""
    t = cfg.trainer
    fixes = [f"lower trainer.lr (now {t.lr:g})"]
    if t.max_grad_norm <= 0:
        fixes.append("clip gradients (trainer.max_grad_norm=1.0)")
    fixes.append("or skip a few such steps (trainer.max_nonfinite_skips=N)")
    kept = ""
    if run_dir is not None:
        latest = latest_checkpoint(run_dir)
        kept = f"; nothing non-finite was saved, the last checkpoint ({latest.name}) stays" if latest else \
            "; nothing non-finite was saved"
    return RunError("trainer.lr", f"training diverged at step {step}: {what}; {', '.join(fixes)}{kept}")


def check_finite_tensors(tensors: Mapping[str, Any], cfg, step: int, what: str, run_dir: Path) -> None:
    """Refuse to save `tensors` (the adapter's, an optimizer state) holding NaN or inf."""
    bad = nonfinite_names(tensors)
    if bad:
        raise divergence_error(cfg, step, f"the {what} holds non-finite values ({bad[0]}"
                                          f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) and was "
                                          f"not saved", run_dir)


# ------------------------------------------------------------------------------ save and load
def save_checkpoint(run_dir: Path, state: TrainState, run: Run, keep: int, protect: frozenset[str] = frozenset()) -> Path:
    """Save adapter, optimizer, scheduler, progress and config (main process) and every
    process's RNG into a temporary folder, list them in its manifest, then rename it into place
    and prune old ones. Every process checks the tensors are finite first (they agree)."""
    acc = run.accelerator
    root = run_dir / CHECKPOINTS
    tmp = root / f".tmp-step-{state.step:08d}"
    final = root / f"step-{state.step:08d}"
    # Every process takes part in gathering sharded (FSDP) tensors; the main one writes.
    tensors = run.adapter.state_dict()
    optimizer = optimizer_state(acc, run.model, run.optimizer)
    check_finite_tensors(tensors, run.cfg, state.step, "adapter", run_dir)
    check_finite_tensors(optimizer, run.cfg, state.step, "optimizer state", run_dir)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(run.adapter, tmp / "adapter", tensors=tensors)
        save_state(optimizer, tmp, "optimizer")
        save_state(run.scheduler.state_dict(), tmp, "scheduler")
        (tmp / PROGRESS).write_text(json.dumps(state.progress(), indent=2))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    acc.wait_for_everyone()
    save_state(rng_state(), tmp, f"rng-{acc.process_index}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp)
        replace_dir(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                if old.name not in protect:
                    shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, state: TrainState, run: Run, process_index: int) -> None:
    """Load a complete checkpoint (safetensors and JSON only); a ConfigError if it is not."""
    problem = check_checkpoint(folder)
    if problem is not None:
        raise ConfigError("hydra.run.dir", f"checkpoint {folder} is incomplete ({problem}); run again "
                                           f"to resume from the previous complete one")
    try:
        run.adapter.load_state_dict(load_file(str(folder / "adapter" / ADAPTER_WEIGHTS)))
        saved_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        run.adapter.load_extra_state(saved_cfg.get("state", {}))
        load_optimizer_state(run.accelerator, run.model, run.optimizer, load_state(folder, "optimizer"))
        run.scheduler.load_state_dict(load_state(folder, "scheduler"))
        state.load_progress(json.loads((folder / PROGRESS).read_text()))
        if (folder / f"rng-{process_index}.json").exists():
            set_rng_state(load_state(folder, f"rng-{process_index}"))
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as e:
        raise ConfigError("hydra.run.dir", f"checkpoint {folder} does not load ({type(e).__name__}: "
                                           f"{' '.join(str(e).split())[:200]}); delete it to resume "
                                           f"from the one before") from e
