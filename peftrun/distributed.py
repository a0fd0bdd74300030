"""The distributed environment of a job started by a scheduler rather than a launcher.

`torchrun` and `accelerate launch` export RANK / WORLD_SIZE / MASTER_ADDR themselves. A SLURM job
submitted through submitit (hydra/launcher=slurm) starts one task per GPU with only SLURM's (or
submitit's) variables, so they are translated here before Accelerate starts.
"""

from __future__ import annotations

import os
from pathlib import Path


def export_scheduler_env() -> None:
    """Set torch.distributed's variables from submitit's job environment, when inside a
    multi-task submitit job and no launcher set them already."""
    if "WORLD_SIZE" in os.environ:
        return
    if not any(k.startswith(("SUBMITIT_", "SLURM_JOB_ID")) for k in os.environ):
        return
    try:
        import submitit

        env = submitit.JobEnvironment()
    except Exception:  # not a submitit job after all
        return
    if env.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(env.num_nodes, 1)),
        MASTER_ADDR=env.hostnames[0],
        # One port per job, so two jobs sharing a node do not collide.
        MASTER_PORT=str(20000 + int(str(env.job_id).split("_")[0]) % 20000),
    )


# ------------------------------------------------------------------------------ strategies
def check_sharding(cfg) -> None:
    """trainer.strategy=fsdp with a method or backbone it cannot shard: refused before weights load."""
    from .errors import ConfigError
    from .methods import method_class

    if cfg.trainer.strategy != "fsdp":
        return
    reason = method_class(cfg.method.name).fsdp_unsupported
    if reason:
        raise ConfigError("trainer.strategy", f"method {cfg.method.name} cannot be sharded: {reason}; use trainer.strategy=ddp")
    if cfg.model.quantization:
        raise ConfigError("trainer.strategy", "FSDP does not shard bitsandbytes-quantized backbones here; "
                          "use trainer.strategy=ddp with model.quantization, or an unquantized backbone")


def make_accelerator(trainer, run_dir=None):
    """The run's Accelerator. trainer.strategy=fsdp turns on Accelerate's FSDP2 plugin (one
    fully_shard unit per decoder layer, plus the root). trainer.report_to: Accelerate's
    trackers, their files under `run_dir` (TensorBoard's in <run_dir>/tensorboard)."""
    import torch
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import ProjectConfiguration
    from accelerate.utils import DistributedType

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[trainer.precision]
    # Accelerate treats a multi-process launch as CPU-distributed (gloo) only when told to.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    plugin = None
    if trainer.strategy == "fsdp":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
        )
    from .config import tracker_names

    trackers = tracker_names(trainer)
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tensorboard"))
    acc = Accelerator(mixed_precision=mixed, cpu=cpu_processes, fsdp_plugin=plugin,
                      log_with=trackers or None, project_config=project)
    if plugin is not None and cpu_processes and acc.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate enables its FSDP plugin for accelerator back-ends only; torch's FSDP2 runs on
        # CPU processes (gloo) too, so CPU runs take the same sharded path as GPU runs.
        if mixed != "no":
            plugin.set_mixed_precision(mixed)
        from accelerate.state import PartialState

        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate does on GPUs
    if plugin is None and is_sharded(acc):
        from .errors import ConfigError

        raise ConfigError("trainer.strategy", "the launcher turned on FSDP (an accelerate config or "
                          "ACCELERATE_USE_FSDP); set trainer.strategy=fsdp, or launch without FSDP")
    return acc


def is_sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def optimizer_state(acc, model, optimizer) -> dict:
    """The optimizer's state as a checkpoint stores it (FSDP: gathered whole, on every process)."""
    if not is_sharded(acc):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Accelerate's wrapper hides the torch optimizer these functions recognize.
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(acc, model, optimizer, state: dict) -> None:
    if not is_sharded(acc):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def padded_shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """Items rank, rank + world, ... padded (with its last item, or the first of all) to the
    length of the longest shard, and how many are real: every process then runs the same number
    of forwards, which sharded (FSDP) models need, each gathering its layers with the others."""
    mine = items[rank::world]
    longest = -(-len(items) // world)
    filler = (mine or items)[-1:] if items else []
    return mine + filler * (longest - len(mine)), len(mine)
