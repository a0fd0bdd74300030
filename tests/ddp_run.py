"""Run under `torchrun --nproc_per_node 2` by the multi-process tests: trains a method through the
real loop, then each process writes the adapter tensors it holds (rank<k>.safetensors), its
initial ones (init<k>.safetensors) and how many backbone weights it holds itself
(shard<k>.json: sharded runs hold a part), so a test can compare processes.

    torchrun --nproc_per_node 2 tests/ddp_run.py METHOD RUN_DIR [override ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from conftest import compose_config  # this script's folder (tests/) is first on sys.path
from peftrun.train.loop import train


class DumpAdapter:
    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = run_dir, rank

    def dump(self, state, prefix: str) -> None:
        adapter = state.run.adapter
        blocks = list(getattr(adapter, "blocks", {}).values())
        # DDP must not untie Tied-LoRA's tensors: every layer still reads the one A and B.
        assert all(b.A is blocks[0].A and b.B is blocks[0].B for b in blocks), "tied tensors were untied"
        save_file(adapter.state_dict(), str(self.run_dir / f"{prefix}{self.rank}.safetensors"))

    def on_train_start(self, state) -> None:
        self.dump(state, "init")
        frozen = [p for p in state.run.model.parameters() if not p.requires_grad]
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
        sizes = {"held": held, "total": sum(p.numel() for p in frozen)}
        (self.run_dir / f"shard{self.rank}.json").write_text(json.dumps(sizes))

    def on_train_end(self, state) -> None:
        self.dump(state, "rank")


def main() -> None:
    method, run_dir = sys.argv[1], Path(sys.argv[2])
    cfg = compose_config(f"method={method}", "trainer.num_processes=2", *sys.argv[3:])
    train(cfg, run_dir, extra_callbacks=[DumpAdapter(run_dir, int(os.environ["RANK"]))])


if __name__ == "__main__":
    main()
