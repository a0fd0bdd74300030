"""`method=tied_lora`: the schema of peftrun/peftrun/conf/method/tied_lora.yaml, the presets, and the rules a
freeze pattern must follow (`resolve_flags`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from ...config import MethodConfig
from ...errors import ConfigError


@dataclass
class TiedLoraConfig(MethodConfig):
    """Tied-LoRA: h_i = W_i x + v_i * (B (u_i * (A x))), A and B shared by every layer.
    `preset` fills every flag below that is left null; set a flag to reach any other pattern."""

    name: str = "tied_lora"
    preset: str = "tl6"  # lora (the paper's vBuA, untied) | tl5 | tl6 | vera
    r: int = 8  # no alpha: the paper's alpha = r, so the update is unscaled
    # "qkv": the attention's q|k|v output as one fused projection (q_proj/k_proj/v_proj or
    # c_attn); other entries are module-name suffixes (o_proj, up_proj, c_fc...), each kind with
    # its own tied A and B.
    targets: List[str] = field(default_factory=lambda: ["qkv"])
    dropout: float = 0.0  # on the adapter's input, once per layer and target
    train_A: Optional[bool] = None  # A (r x d_in) trains
    tie_A: Optional[bool] = None  # one A for every layer (false: one per layer)
    init_A: Optional[str] = None  # kaiming | gaussian | zeros
    train_B: Optional[bool] = None  # B (d_out x r) trains
    tie_B: Optional[bool] = None  # one B for every layer
    init_B: Optional[str] = None  # kaiming | gaussian | zeros
    train_u: Optional[bool] = None  # the per-layer vector u (r) trains
    init_u: Optional[float] = None  # u's initial value (a frozen u must be 1)
    train_v: Optional[bool] = None  # the per-layer vector v (d_out) trains
    init_v: Optional[float] = None  # v's initial value (a frozen v must be 1)


MATRIX_INITS = ("kaiming", "gaussian", "zeros")
COMPONENTS = ("A", "B", "u", "v")
FLAGS = tuple(f"{k}_{c}" for c in "AB" for k in ("train", "tie", "init")) + tuple(
    f"{k}_{c}" for c in "uv" for k in ("train", "init")
)

# The DESIGN table. The paper does not give B's init for tl6 (v starts at 0, so B must not):
# Kaiming-uniform, as VeRA initializes its shared matrices, is our choice.
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's vBuA without tying: a plain LoRA per layer (u, v fixed at 1)
    "lora": dict(train_A=True, tie_A=False, init_A="kaiming", train_B=True, tie_B=False, init_B="zeros",
                 train_u=False, init_u=1.0, train_v=False, init_v=1.0),
    "tl5": dict(train_A=True, tie_A=True, init_A="kaiming", train_B=True, tie_B=True, init_B="zeros",
                train_u=False, init_u=1.0, train_v=False, init_v=1.0),
    "tl6": dict(train_A=True, tie_A=True, init_A="kaiming", train_B=True, tie_B=True, init_B="kaiming",
                train_u=True, init_u=1.0, train_v=True, init_v=0.0),
    "vera": dict(train_A=False, tie_A=True, init_A="kaiming", train_B=False, tie_B=True, init_B="kaiming",
                 train_u=True, init_u=1.0, train_v=True, init_v=0.0),
}


def resolve_flags(cfg: Any) -> dict[str, Any]:
    """The preset's flags with every non-null override applied, checked against the rules:

    1. something trains;
    2. exactly one of A, B, u, v starts at zero: none would not start at the backbone, two would
       never move (each one's gradient is a product with the other);
    3. the zero-started factor trains, or the update stays zero for ever (a dead adapter);
    4. a frozen u or v is fixed at 1: another constant only rescales what A and B learn.
    """
    if cfg.preset not in PRESETS:
        raise ConfigError("method.preset", f"choose one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    flags = dict(PRESETS[cfg.preset])
    for key in FLAGS:
        value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        if value is not None:
            flags[key] = value
    for c in "AB":
        if flags[f"init_{c}"] not in MATRIX_INITS:
            raise ConfigError(f"method.init_{c}", f"choose {' | '.join(MATRIX_INITS)}, got {flags[f'init_{c}']!r}")
    for c in "uv":
        flags[f"init_{c}"] = float(flags[f"init_{c}"])
        if not math.isfinite(flags[f"init_{c}"]):
            raise ConfigError(f"method.init_{c}", f"must be a finite number, got {flags[f'init_{c}']}")

    if not any(flags[f"train_{c}"] for c in COMPONENTS):
        raise ConfigError("method.train_A", "nothing trains: set one of method.train_A/B/u/v=true")
    zero = [c for c in "AB" if flags[f"init_{c}"] == "zeros"] + [c for c in "uv" if flags[f"init_{c}"] == 0.0]
    if not zero:
        raise ConfigError(
            "method.init_B",
            "no factor starts at zero, so the model would not start at the backbone; "
            "set method.init_B=zeros (with u, v fixed) or method.init_v=0 (with v trained)",
        )
    if len(zero) > 1:
        raise ConfigError(
            f"method.init_{zero[1]}",
            f"{' and '.join(zero)} all start at zero, so none of them ever gets a gradient (a dead "
            f"adapter); start only one at zero",
        )
    if not flags[f"train_{zero[0]}"]:
        c = zero[0]
        raise ConfigError(
            f"method.train_{c}",
            f"{c} starts at zero and is frozen, so the update stays zero (a dead adapter); "
            f"set method.train_{c}=true or start it non-zero",
        )
    for c in "uv":
        if not flags[f"train_{c}"] and flags[f"init_{c}"] != 1.0:
            raise ConfigError(
                f"method.init_{c}",
                f"a frozen {c} fixed at {flags[f'init_{c}']:g} only rescales what A and B learn; "
                f"set method.init_{c}=1 or method.train_{c}=true",
            )
    return flags

