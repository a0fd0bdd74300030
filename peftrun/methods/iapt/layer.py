"""IAPT's modules: the soft-prompt generator of one layer, and the state IAPT keeps on each
attention module (generators and gates keyed by adapter name, the soft keys/values of the
current batch), set by a forward pre-hook before the attention runs."""

from __future__ import annotations

import torch
from torch import nn

from ..base import AdapterLayer
from ..common.rational import Rational
from ..common.routing import RequestRows
from .keys import attention_modules, call_arguments, call_cache, soft_keys_values
from .packed import PackedPrompts

__all__ = ["IaptLayer", "PromptState", "SoftPromptGenerator", "attention_modules"]


class SoftPromptGenerator(nn.Module):
    """down (d -> m), self-attention pooling into n_soft vectors, rational activation, up (m -> d)."""

    def __init__(self, hidden: int, bottleneck: int, n_soft: int, degrees: tuple[int, int], init: str, device=None):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device)
        # Learnable pooling queries; with the 1/sqrt(m) score scale they start near mean pooling.
        self.queries = nn.Parameter(torch.randn(bottleneck, n_soft, device=device) * bottleneck**-0.5)
        self.activation = Rational(*degrees, init=init, device=device)
        self.up = nn.Linear(bottleneck, hidden, device=device)

    def forward(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d), prompt_mask (B, T) bool -> soft tokens (B, n_soft, d)."""
        h = self.down(hidden)
        scores = (h @ self.queries) * h.shape[-1] ** -0.5  # (B, T, n_soft)
        keep = prompt_mask[..., None]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        # Softmax over instruction positions only; a row with no instruction token pools to 0.
        weights = scores.softmax(dim=1) * keep
        pooled = weights.transpose(1, 2) @ h  # (B, n_soft, m)
        return self.up(self.activation(pooled))


class PromptState:
    """The prompt of the next forward, shared by every IAPT layer of a model: its mask and, for
    packed rows, where each example sits (packed.py)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.packed: PackedPrompts | None = None

    def set(self, mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        if segment_ids is not None and mask is None:
            raise ValueError("IAPT: a packed batch (segment_ids) needs its prompt_mask")
        self.mask = mask
        self.packed = None if segment_ids is None else PackedPrompts(mask, segment_ids)

    def for_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The mask as (hidden batch, hidden length) bool: rows repeated for beam search /
        num_return_sequences (the batch is expanded with repeat_interleave), columns padded with
        0 when the sequence grew past the prompt (generation without a KV cache)."""
        batch, length = hidden.shape[:2]
        if self.mask is None:  # nobody said which tokens are the prompt: all of them are
            return torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        mask = self.mask.to(device=hidden.device, dtype=torch.bool)
        if batch != mask.shape[0]:
            if batch % mask.shape[0]:
                raise RuntimeError(f"IAPT: prompt mask of {mask.shape[0]} rows for a batch of {batch}")
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if mask.shape[1] > length:
            raise RuntimeError(f"IAPT: prompt mask of width {mask.shape[1]} for {length} positions")
        return nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)


class IaptLayer(AdapterLayer):
    """IAPT's state in one attention module: generators and gates keyed by adapter name (several
    adapters can sit on one backbone; an adapter with `gate: none` has no gate), and the soft
    keys/values of the current batch."""

    adapter_owned = True  # its linear layers are IAPT's, not targets for another method
    held = "generators"

    def __init__(self, prompt: PromptState, num_heads: int):
        super().__init__()
        self.generators = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        self.num_heads = num_heads
        self.prompt = prompt
        # Of the current batch, set at prefill: the soft keys/values, the gate (per row when
        # routed; None: no gate, the joint attention), and which soft positions each row sees
        # (None: all; routed tenants may differ in n_soft, their soft tokens are then
        # zero-padded and the padding hidden), or each token (packed rows: its example's).
        self.soft_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gate: torch.Tensor | None = None
        self.soft_visible: torch.Tensor | None = None
        self.decoding = False  # the KV cache holds this layer's past: the soft tokens are the prefill's
        self.capturing = False  # the attention runs on the soft tokens, for their keys and values

    def add_adapter(self, name: str, generator: SoftPromptGenerator, gated: bool = True, device=None) -> None:
        self.generators[name] = generator
        if gated:  # per head, from 0: the backbone exactly at the start
            self.gates[name] = nn.Parameter(torch.zeros(self.num_heads, device=device))
        self.active_adapter = name

    def gate_of(self, name: str) -> torch.Tensor | None:
        return self.gates[name] if name in self.gates else None

    def end_route(self) -> None:
        self.route = None
        self.soft_kv = self.gate = self.soft_visible = None
        self.decoding = False


def _pre_hook(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    """Compute this layer's soft keys/values before its attention runs (prefill or full forward);
    keep the prefill's ones while a KV cache already holds this layer's past."""
    layer: IaptLayer = attn.iapt
    if layer.capturing:
        return
    rows = layer.route.rows if layer.route is not None else None
    name = layer.active_adapter if rows is None else rows.single
    if rows is None or rows.single is not None:
        if name not in layer.generators:
            layer.soft_kv = layer.gate = None
            return
    elif not any(n in layer.generators for n in rows.tenants):
        layer.soft_kv = layer.gate = None
        return
    call = call_arguments(attn, args, kwargs)
    hidden = call["hidden_states"]
    cache = call_cache(call)
    layer.decoding = cache is not None and cache.get_seq_length(attn.layer_idx) > 0
    if layer.decoding:
        if layer.soft_kv is None or layer.soft_kv[0].shape[0] != hidden.shape[0]:
            raise RuntimeError("IAPT: a decode step without the soft tokens of its prefill; "
                               "start generation from the prompt (empty cache)")
        return
    layer.soft_visible = None
    packed = layer.prompt.packed
    if packed is not None and name is None:
        raise ValueError("IAPT: packed rows (segment_ids) with one adapter per row are not supported")
    if packed is not None:
        soft, layer.soft_visible = packed.soft_tokens(layer.generators[name], hidden)
        layer.gate = _as_output_gate(layer.gate_of(name))
    elif name is not None:
        soft = layer.generators[name](hidden.float(), layer.prompt.for_hidden(hidden)).to(hidden.dtype)
        layer.gate = _as_output_gate(layer.gate_of(name))
    else:
        soft, layer.gate, layer.soft_visible = _per_request(layer, rows, hidden, layer.prompt.for_hidden(hidden))
    layer.soft_kv = soft_keys_values(attn, soft, call)


def _as_output_gate(gate: torch.Tensor | None) -> torch.Tensor | None:
    return None if gate is None else gate.view(1, 1, -1, 1)  # (B, T, H, D) outputs


def _per_request(layer: IaptLayer, rows: RequestRows, hidden: torch.Tensor, prompt_mask: torch.Tensor):
    """Soft tokens (batch, n_soft, d), gates (batch, 1, H, 1) and soft visibility of a
    mixed-tenant batch: each tenant's generator reads only its rows; the backbone's rows get
    zero soft tokens and a zero gate (exactly the backbone); a tenant without a gate, 1."""
    rows.check_batch(hidden.shape[0])
    tenants = [n for n in rows.tenants if n in layer.generators]
    n_soft = {n: layer.generators[n].queries.shape[1] for n in tenants}
    width = max(n_soft.values())
    soft = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
    gate = torch.zeros(hidden.shape[0], layer.num_heads, device=hidden.device)
    visible = torch.ones(hidden.shape[0], width, dtype=torch.bool, device=hidden.device)
    for name in tenants:
        index = rows.rows(name, hidden.device)
        own = layer.generators[name](hidden.index_select(0, index).float(), prompt_mask.index_select(0, index))
        soft[index, : n_soft[name]] = own.to(hidden.dtype)
        own_gate = layer.gate_of(name)
        gate[index] = 1.0 if own_gate is None else own_gate.to(gate.dtype)
        visible[index, n_soft[name]:] = False
    return soft, gate.view(-1, 1, layer.num_heads, 1), None if bool(visible.all()) else visible

