"""The distributed environment of a job started by a scheduler rather than a launcher.

`torchrun` and `accelerate launch` export RANK / WORLD_SIZE / MASTER_ADDR themselves. A SLURM job
submitted through submitit (hydra/launcher=slurm) starts one task per GPU with only SLURM's (or
submitit's) variables, so they are translated here before Accelerate starts.
"""

from __future__ import annotations

import os


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
