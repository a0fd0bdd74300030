"""`method=iapt`: the schema of peftrun/conf/method/iapt.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ...config import MethodConfig

GATES = ("per_head", "none")


@dataclass
class IaptConfig(MethodConfig):
    """IAPT: per layer, a generator turns the instruction's hidden states into `n_soft` soft
    tokens (down d -> bottleneck, self-attention pooling, rational activation, up -> d) that join
    the layer's attention as extra key/value positions. A per-head gate (init 0) makes step 0
    the backbone exactly; `gate: none` is the paper's form (the joint softmax, no gate)."""

    name: str = "iapt"
    bottleneck: int = 320  # m, the generator's hidden width (the group's later runs: 320)
    n_soft: int = 4  # soft tokens per layer (the paper: 4)
    # Degrees [m, n] of the rational activation P_m(x) / (1 + |Q_n(x)|) (the paper: 6, 5);
    # a fit of these degrees must ship in peftrun/methods/common/rational_init.json.
    rational_degrees: List[int] = field(default_factory=lambda: [6, 5])
    rational_init: str = "gelu"  # the activation it starts as: gelu | relu | silu
    # Learning rate of the rational coefficients (the authors' group: 1e-6); null: trainer.lr.
    # It decays with the same schedule as the rest.
    rational_lr: Optional[float] = 1e-6
    # joint: the coefficients learn from training batches with the rest; alternating: from dev
    # batches only, one step after every `rational_update_every` training steps.
    rational_update: str = "joint"
    rational_update_every: int = 1
    rational_dev_batch_size: int = 16
    # per_head: out = out_backbone + g (out_joint - out_backbone), g per head from 0 (an exact
    # start the paper does not have); none: the paper's form, the joint softmax over [soft; real].
    gate: str = "per_head"
    # Learning rate of the gates; null: trainer.lr. Decays with the same schedule as the rest.
    gate_lr: Optional[float] = None
