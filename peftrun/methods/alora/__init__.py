"""ALoRA — Allocating LoRA (Liu et al., NAACL 2024): gated LoRA ranks reallocated by importance."""

from .config import AloraConfig
from .model import AloraAdapter, AloraMethod
from .schedule import AllocationSchedule, reallocate, reinit_slot
from .scoring import ablation_losses

__all__ = ["AloraConfig", "AloraAdapter", "AloraMethod", "AllocationSchedule", "reallocate", "reinit_slot",
           "ablation_losses"]
