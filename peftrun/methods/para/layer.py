"""PARA's runtime on the backbone: one vector generator per decoder layer (holding every PARA
adapter's tensors, keyed by adapter name) and the hooks that apply its vectors. See model.py for
how prefill and decode steps differ."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.pooling import by_example, check_mask, pool
from ..common.routing import RequestRows
from .plan import LayerPlan, Segment

GENERATOR = "para_generator"  # the child module added to every decoder layer
RUNTIME = "_peftrun_para"  # attribute of the backbone holding the shared runtime state

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


# ---------------------------------------------------------------------------------- generator
class ParaGenerator(nn.Module):
    """The vector generator of one decoder layer, for every PARA adapter on the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.ParameterDict()  # name -> (r, d)
        self.query = nn.ParameterDict()  # name -> (r,), self-attention pooling only
        self.up = nn.ParameterDict()  # name -> (width, r)
        self.pooling: dict[str, str] = {}
        self.activation: dict[str, str] = {}
        self.segments: dict[str, dict[str, list[Segment]]] = {}
        self.out_features: dict[str, int] = {}
        self._indices: dict[tuple, torch.Tensor] = {}  # (adapter, module, device) -> column -> vector entry + 1
        # (batch, width) of the current prompts (one adapter); (examples, width) for a packed batch.
        self.vectors: torch.Tensor | None = None
        # Module path -> (batch, out_features) multiplier of its output for the current prompts
        # ((examples, out_features) for a packed batch).
        self.scales: dict[str, torch.Tensor] | None = None

    def add_adapter(self, name: str, plan: LayerPlan, hidden_size: int, cfg: Any, device) -> None:
        if name in self.down:
            raise ValueError(f"a PARA adapter named {name!r} is already attached to {plan.path}")
        r = cfg.bottleneck
        down = torch.empty(r, hidden_size, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.down[name] = nn.Parameter(down)
        if cfg.pooling == "self_attention":
            # Zero queries pool by the mean at first; training sharpens them.
            self.query[name] = nn.Parameter(torch.zeros(r, device=device, dtype=torch.float32))
        # Zero: every vector is exactly 1 at step 0, the model is the backbone.
        self.up[name] = nn.Parameter(torch.zeros(plan.width, r, device=device, dtype=torch.float32))
        self.pooling[name] = cfg.pooling
        self.activation[name] = cfg.activation
        self.segments[name] = plan.segments
        self.out_features.update(plan.out_features)

    def forward(self, name: str, hidden: torch.Tensor, prompt_mask: torch.Tensor,
                examples: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(batch, seq, d) hidden states and (batch, seq) prompt mask -> (batch, width) vectors.
        A packed batch (`examples`: pooling.by_example's index and valid mask) -> one vector per
        example, pooled over that example's own prompt tokens: (examples, width)."""
        down = self.down[name]
        z = F.linear(hidden.to(down.dtype), down)
        if examples is not None:
            index, valid = examples
            z, prompt_mask = z.flatten(0, 1)[index], valid  # (examples, longest prompt, r)
        pooled = pool(z, prompt_mask, self.pooling[name], self.query[name] if name in self.query else None)
        return 1.0 + F.linear(ACTIVATIONS[self.activation[name]](pooled), self.up[name])

    def multipliers(self, name: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adapter `name`'s (batch, width) vectors as a (batch, out_features) multiplier per
        module it scales. Unscaled columns (GPT-2's k slice, a fused projection's other heads)
        get ones."""
        out = {}
        for path, segments in self.segments.get(name, {}).items():
            width = self.out_features[path]
            if len(segments) == 1 and segments[0].start == 0 and segments[0].end == width:
                s = segments[0]
                out[path] = vectors[:, s.offset : s.offset + width]
                continue
            # Entry 0 is a one; column c of the module takes entry index[c].
            padded = torch.cat([vectors.new_ones(vectors.shape[0], 1), vectors], dim=-1)
            out[path] = padded.index_select(1, self._index(name, path, vectors.device))
        return out

    def _index(self, name: str, path: str, device: torch.device) -> torch.Tensor:
        key = (name, path, device)
        if key not in self._indices:
            index = torch.zeros(self.out_features[path], dtype=torch.long)
            for s in self.segments[name][path]:
                index[s.start : s.end] = torch.arange(s.offset + 1, s.offset + 1 + s.end - s.start)
            self._indices[key] = index.to(device)
        return self._indices[key]

    def prefill(self, name: str, hidden: torch.Tensor, prompt_mask: torch.Tensor,
                examples: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One adapter for every row: compute and keep the vectors and multipliers (per example
        of a packed batch)."""
        self.vectors = self(name, hidden, prompt_mask, examples)
        self.scales = self.multipliers(name, self.vectors)

    def prefill_per_request(self, rows: RequestRows, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Row i through adapter rows.names[i]: each tenant's generator reads only its rows; the
        backbone's rows (and rows of adapters this layer does not hold) get multipliers of 1."""
        self.vectors = None  # the widths may differ between tenants
        scales: dict[str, torch.Tensor] = {}
        for name in rows.tenants:
            if name not in self.down:
                continue
            index = rows.rows(name, hidden.device)
            vectors = self(name, hidden.index_select(0, index), prompt_mask.index_select(0, index))
            for path, m in self.multipliers(name, vectors).items():
                if path not in scales:
                    scales[path] = m.new_ones(hidden.shape[0], self.out_features[path])
                scales[path] = scales[path].index_copy(0, index, m)
        self.scales = scales


# ------------------------------------------------------------------------------------ runtime
class ParaRuntime:
    """State shared by the hooks of one backbone: the active adapter, the prompt mask, and
    whether the current forward is a prefill or a decode step."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.route: RequestRows | None = None  # a mixed-tenant batch: one adapter per row
        self.prompt_mask: torch.Tensor | None = None  # as given to set_prompt_mask
        self.segment_ids: torch.Tensor | None = None  # a packed batch's, as given to set_prompt_mask
        self.forward_mask: torch.Tensor | None = None  # fitted to the current forward's batch
        # A packed forward: where each example's prompt sits (pooling.by_example), and each
        # token's example (flattened rows), which picks the token's multiplier.
        self.examples: tuple[torch.Tensor, torch.Tensor] | None = None
        self.token_example: torch.Tensor | None = None
        self.prefill = False
        self.rows = 0  # sequences in the current forward
        self.length = 0  # tokens per sequence in the current forward
        self.generators: list[ParaGenerator] = []
        self.hooked: set[int] = set()  # ids of modules that already carry our hooks

    def set_prompt_mask(self, mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> None:
        self.prompt_mask, self.segment_ids = mask, segment_ids
        self.forward_mask = self.examples = self.token_example = None
        for generator in self.generators:  # vectors belong to the previous prompts
            generator.vectors = generator.scales = None

    def applies(self) -> bool:
        """Whether this forward uses any PARA adapter."""
        return bool(self.route.tenants) if self.route is not None else self.active is not None

    # -- hooks
    def before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.applies():
            return
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.prefill = past == 0
        self.rows, self.length = inputs.shape[0], inputs.shape[1]
        if not self.prefill:
            return  # a decode step: the layers reuse the vectors of the prefill
        mask = self.prompt_mask
        if mask is None:
            raise RuntimeError(
                "PARA needs to know the prompt: call adapter.set_prompt_mask(prompt_mask) before the forward"
            )
        if self.segment_ids is not None:
            self.fit_packed(mask, inputs)
            return
        batch, seq = inputs.shape[0], inputs.shape[1]
        if self.route is not None:
            self.route.check_batch(batch)
        if seq < mask.shape[1]:
            raise RuntimeError(
                f"the prompt mask is {mask.shape[1]} tokens wide but the input only {seq}; "
                "set the mask of this batch"
            )
        if batch != mask.shape[0]:
            if batch % mask.shape[0]:
                raise RuntimeError(
                    f"the prompt mask has {mask.shape[0]} rows but the input {batch}; set the mask of this batch"
                )
            # Beam search / num_return_sequences repeat each prompt in place (repeat_interleave).
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        if seq > mask.shape[1]:
            # Generation without a KV cache re-reads the prompt followed by what was generated.
            mask = F.pad(mask, (0, seq - mask.shape[1]))
        mask = mask.to(inputs.device)
        check_mask(mask)
        self.forward_mask = mask

    def fit_packed(self, mask: torch.Tensor, inputs: torch.Tensor) -> None:
        """A packed batch (a training layout: the mask and segments cover the input exactly): find
        each example's prompt once per forward, for every layer."""
        segments = self.segment_ids
        if self.route is not None:
            raise RuntimeError("PARA serves mixed-tenant batches one example per row; packed batches are for training")
        if tuple(mask.shape) != tuple(inputs.shape[:2]) or tuple(segments.shape) != tuple(mask.shape):
            raise RuntimeError(
                f"a packed batch's prompt mask {tuple(mask.shape)} and segment ids {tuple(segments.shape)} must "
                f"have the input's shape {tuple(inputs.shape[:2])}; set those of this batch"
            )
        mask, segments = mask.to(inputs.device), segments.to(inputs.device)
        self.forward_mask = mask
        self.examples = by_example(mask, segments)
        self.token_example = segments.clamp(min=0).flatten()  # padding: example 0's (no loss, unseen)

    def before_layer(self, generator: ParaGenerator, args: tuple, kwargs: dict) -> None:
        if not self.applies():
            return
        name = self.active if self.route is None else self.route.single
        if self.prefill:
            hidden = args[0] if args else kwargs["hidden_states"]
            if name is None:
                generator.prefill_per_request(self.route, hidden, self.forward_mask)
            elif name in generator.down:
                generator.prefill(name, hidden, self.forward_mask, self.examples)
            else:
                generator.vectors, generator.scales = None, {}
        elif generator.scales is None:
            raise RuntimeError(
                "PARA got a decode step with no vectors from a prefill; call adapter.set_prompt_mask "
                "and run the prompt first"
            )

    def after_projection(self, generator: ParaGenerator, path: str, output: torch.Tensor) -> torch.Tensor:
        if not self.applies():
            return output
        scale = generator.scales.get(path) if generator.scales is not None else None
        if scale is None:
            return output
        if self.token_example is not None:
            return self.scale_packed(output, scale)
        if output.dim() == 2 and output.shape[0] == scale.shape[0] * self.length != scale.shape[0]:
            # OPT runs its MLP on the tokens flattened to (batch * length, width), row by row.
            scale = scale.repeat_interleave(self.length, dim=0)
        if scale.shape[0] != output.shape[0]:
            raise RuntimeError(
                f"PARA vectors were computed for {scale.shape[0]} sequences, this forward has {output.shape[0]}; "
                "call adapter.set_prompt_mask with the new batch's prompt mask"
            )
        shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)
        return output * scale.view(shape).to(output.dtype)

    def scale_packed(self, output: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Each token's output times its own example's multiplier ((examples, out) -> per token)."""
        per_token = scale.index_select(0, self.token_example)  # (rows * length, out)
        if output.dim() == 2:  # OPT's MLP: the tokens flattened already
            return output * per_token.to(output.dtype)
        return output * per_token.view(self.rows, self.length, -1).to(output.dtype)


def _runtime(model: nn.Module) -> ParaRuntime:
    runtime = model.__dict__.get(RUNTIME)
    if runtime is None:
        runtime = ParaRuntime()
        model.__dict__[RUNTIME] = runtime  # a plain attribute: not a module, not in state_dict
        model.register_forward_pre_hook(runtime.before_model, with_kwargs=True)
    return runtime

