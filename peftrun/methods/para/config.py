"""`method=para`: the schema of peftrun/conf/method/para.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ...config import MethodConfig


@dataclass
class ParaConfig(MethodConfig):
    """PARA: per layer, a generator pools the layer's input hidden states over the prompt,
    maps them through a bottleneck (down, activation, up) to vectors 1 + up(...) that scale,
    element-wise, the outputs of the targeted projections. Up starts at zero: step 0 is the
    backbone."""

    name: str = "para"
    bottleneck: int = 12  # the generator's hidden width (paper: about 12 on LLaMA-2 7B)
    # Which projection outputs are scaled, by role: q | k | v | o | gate | up | down. Llama-style
    # layers map them to q_proj ... down_proj; GPT-2 to slices of the fused c_attn (q, k, v),
    # c_proj (o), c_fc (up) and mlp.c_proj (down).
    targets: List[str] = field(default_factory=lambda: ["q", "v", "up"])
    pooling: str = "self_attention"  # over prompt tokens: last | mean | max | self_attention
    activation: str = "gelu"  # relu | gelu | silu | tanh | identity
