"""`method=alora`: the schema of peftrun/conf/method/alora.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...config import MethodConfig


@dataclass
class AloraConfig(MethodConfig):
    """ALoRA — Allocating LoRA (not PEFT's Activated LoRA): gated ranks, reallocated by AB-LoRA
    importance on a fixed dev batch."""

    name: str = "alora"
    r_init: int = 8  # open ranks per module at the start
    max_rank: int = 16  # rank slots per module (allocated once; the per-module limit)
    alpha: float = 16.0  # scale alpha / r_init, fixed while ranks move
    dropout: float = 0.0
    targets: Any = "all-linear"
    init: str = "kaiming"
    # Schedule (Algorithm 1): warm-up K1, then N_A rounds every K2; steps override epochs when > 0.
    warmup_epochs: float = 1.0
    warmup_steps: int = 0
    rounds: int = 8
    interval_epochs: float = 0.25
    interval_steps: int = 0
    ranks_per_round: Optional[int] = None  # n_A; null: adapted module kinds per block
    dev_batch_size: int = 32  # the fixed dev batch the importance is measured on
    ablations_per_forward: int = 32  # gate configurations stacked into one forward when scoring
    # exact: the AB-LoRA score by ablation; taylor: its first-order estimate, 2 forward+backward
    # passes a round instead of 2 x (open ranks) forwards (scoring.py; agreement in docs/benchmarks.md)
    score_estimator: str = "exact"
