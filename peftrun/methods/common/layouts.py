"""Where a decoder block takes its queries, keys and values from, and where its MLP projects up
and down: read from the model's config (head counts, head_dim, key/value heads) and checked
against the modules' shapes. PARA (which output columns to scale), IAPT (which module is the
self-attention) and Tied-LoRA (which modules form the fused q|k|v) all ask here.

Attention layouts:

* ``separate``: q_proj, k_proj, v_proj, each its own linear (Llama, Mistral, OPT, GPT-J, Phi-2...);
  their widths are heads x head_dim and kv_heads x head_dim (GQA/MQA).
* ``blocks``: one fused linear, its output q | k | v (GPT-2's c_attn, Phi-3's qkv_proj, Falcon-7B
  and StarCoder's multi-query c_attn, where k and v are one head wide).
* ``interleaved``: one fused linear whose output is per head [q_h k_h v_h] (GPT-NeoX/Pythia,
  Bloom, Falcon without multi-query, GPT-BigCode without multi-query).
* ``grouped``: one fused linear, per key/value group [q ... q k v] (Falcon-40B/180B).
* ``latent``: DeepSeek's multi-head latent attention: q from q_b_proj (q_proj without a query
  low rank), per head [k_nope v] from kv_b_proj; the rotary key part is one head shared by all,
  read from kv_a_proj_with_mqa.

How a fused output is ordered is how the architecture's code views it; when q, k and v are
equally wide no shape can tell blocks from interleaved heads, so that comes from the config
(its model type and flags: `fused_order`), and the widths are checked against the linear.

MLP layouts: gate / up / down of a gated MLP (Phi-3 fuses gate|up into gate_up_proj), up / down
of a plain one (found by shape: hidden -> inner, inner -> hidden), or a mixture of experts whose
experts are stacked 3-D parameters (no dense up projection to name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .targets import is_linear, linear_features

Ranges = tuple[tuple[int, int], ...]  # output columns [start, end) of one module


class LayoutError(ValueError):
    """The block's layout cannot be read; the message says why (no config key: callers add it)."""


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Columns:
    """Output columns of one module (its path inside the block)."""

    module: str
    ranges: Ranges

    def width(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass
class AttentionLayout:
    path: str  # the self-attention module inside the block ("self_attn", "attn", ...)
    kind: str  # separate | blocks | interleaved | grouped | latent
    heads: Heads
    q: Columns
    k: Columns
    v: Columns
    output: str | None  # the output projection (inside the block), if found
    inputs: list[str] = field(default_factory=list)  # the linears reading the block's attention input


@dataclass
class MlpLayout:
    gate: Columns | None = None
    up: Columns | None = None
    down: str | None = None
    experts: str | None = None  # stacked 3-D expert parameters live here (a mixture of experts)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def hidden_size(config) -> int:
    return int(_get(config, "hidden_size", "n_embd", "d_model"))


def heads(config) -> Heads:
    """Query heads, key/value heads and head width of the config's attention."""
    n = int(_get(config, "num_attention_heads", "n_head", "num_heads"))
    kv = _get(config, "num_key_value_heads")
    if kv is None:
        if getattr(config, "new_decoder_architecture", False):  # Falcon-40B/180B
            kv = _get(config, "num_kv_heads", default=n)
        elif getattr(config, "multi_query", False):  # Falcon-7B, StarCoder (GPT-BigCode)
            kv = 1
        else:
            kv = n
    head_dim = _get(config, "head_dim") or hidden_size(config) // n
    return Heads(n, int(kv), int(head_dim))


def fused_order(config) -> str:
    """How a fused q|k|v linear's output is ordered (blocks, interleaved per head, or grouped per
    key/value head): a property of the architecture's code, read from its config."""
    kind = getattr(config, "model_type", "")
    if kind == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return "grouped"
        return "blocks" if getattr(config, "multi_query", False) else "interleaved"
    if kind == "gpt_bigcode":
        return "blocks" if getattr(config, "multi_query", True) else "interleaved"
    if kind in ("gpt_neox", "gpt_neox_japanese", "bloom", "persimmon"):
        return "interleaved"
    return "blocks"


def fused_columns(order: str, h: Heads) -> tuple[Ranges, Ranges, Ranges]:
    """(q, k, v) output columns of a fused q|k|v linear."""
    d = h.head_dim
    if order == "blocks":
        q_end, k_end = h.num_heads * d, (h.num_heads + h.num_kv_heads) * d
        return ((0, q_end),), ((q_end, k_end),), ((k_end, k_end + h.num_kv_heads * d),)
    if order == "interleaved":  # [q_h k_h v_h] per head
        return tuple(tuple((3 * i * d + j * d, 3 * i * d + (j + 1) * d) for i in range(h.num_heads)) for j in range(3))
    if order == "grouped":  # [q ... q k v] per key/value head
        group = h.num_heads // h.num_kv_heads
        span = (group + 2) * d
        q = tuple((g * span, g * span + group * d) for g in range(h.num_kv_heads))
        k = tuple((g * span + group * d, g * span + (group + 1) * d) for g in range(h.num_kv_heads))
        v = tuple((g * span + (group + 1) * d, (g + 1) * span) for g in range(h.num_kv_heads))
        return q, k, v
    raise LayoutError(f"unknown fused q|k|v order {order!r}")


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    """The linear-like direct children of `module` (a wrapped one counts as what it wraps)."""
    return {n: c for n, c in module.named_children() if is_linear(c)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _output_projection(path: str, linears: dict[str, nn.Module], used: set[str], d: int, width: int) -> str | None:
    for name, m in linears.items():
        if name not in used and linear_features(m) == (width, d):
            return _join(path, name)
    return None


def attention_layout(config, block: nn.Module) -> AttentionLayout:
    """The layout of `block`'s self-attention; LayoutError where none is found or the shapes do
    not fit the config's head counts."""
    h = heads(config)
    d = hidden_size(config)
    qw, kvw = h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim
    for path, module in block.named_modules():
        if getattr(module, "is_cross_attention", False):
            continue
        linears = _linears(module)
        if {"q_proj", "k_proj", "v_proj"} <= set(linears):
            widths = [linear_features(linears[n])[1] for n in ("q_proj", "k_proj", "v_proj")]
            if widths != [qw, kvw, kvw]:
                raise LayoutError(f"{_join(path, 'q_proj')}/k_proj/v_proj are {widths} wide, but the config's "
                                  f"{h.num_heads} heads ({h.num_kv_heads} key/value) of {h.head_dim} make "
                                  f"{[qw, kvw, kvw]}")
            names = [_join(path, n) for n in ("q_proj", "k_proj", "v_proj")]
            q, k, v = (Columns(n, ((0, w),)) for n, w in zip(names, widths))
            out = _output_projection(path, linears, {"q_proj", "k_proj", "v_proj"}, d, qw)
            return AttentionLayout(path, "separate", h, q, k, v, out, names)
        if {"kv_a_proj_with_mqa", "kv_b_proj"} <= set(linears):
            return _latent_layout(config, path, linears, h, d)
        fused = [n for n, m in linears.items() if linear_features(m) == (d, qw + 2 * kvw)]
        if len(fused) == 1:
            order = fused_order(config)
            if order == "interleaved" and h.num_kv_heads != h.num_heads:
                raise LayoutError(f"{_join(path, fused[0])} interleaves q, k, v per head, which needs as many "
                                  f"key/value heads as heads ({h.num_kv_heads} != {h.num_heads})")
            q, k, v = (Columns(_join(path, fused[0]), r) for r in fused_columns(order, h))
            out = _output_projection(path, linears, set(fused), d, qw)
            return AttentionLayout(path, order, h, q, k, v, out, [_join(path, fused[0])])
    raise LayoutError(f"no self-attention in {type(block).__name__} has q/k/v projections of the config's "
                      f"{h.num_heads} heads ({h.num_kv_heads} key/value) of width {h.head_dim}, separate "
                      f"or fused into one linear")


def _latent_layout(config, path: str, linears: dict[str, nn.Module], h: Heads, d: int) -> AttentionLayout:
    nope = int(config.qk_nope_head_dim)
    rope = int(config.qk_rope_head_dim)
    vd = int(config.v_head_dim)
    q_name = "q_b_proj" if "q_b_proj" in linears else "q_proj"
    if q_name not in linears:
        raise LayoutError(f"{path} has a latent key/value projection but no q_proj or q_b_proj")
    q = Columns(_join(path, q_name), ((0, h.num_heads * (nope + rope)),))
    kv = _join(path, "kv_b_proj")
    width = linear_features(linears["kv_b_proj"])[1]
    if width != h.num_heads * (nope + vd) or linear_features(linears[q_name])[1] != q.width():
        raise LayoutError(f"{path}'s latent projections do not fit {h.num_heads} heads of "
                          f"{nope}+{rope} (query/key) and {vd} (value)")
    k = Columns(kv, tuple((i * (nope + vd), i * (nope + vd) + nope) for i in range(h.num_heads)))
    v = Columns(kv, tuple((i * (nope + vd) + nope, (i + 1) * (nope + vd)) for i in range(h.num_heads)))
    out = _output_projection(path, linears, {q_name, "kv_b_proj"}, d, h.num_heads * vd)
    first = "q_proj" if q_name == "q_proj" else "q_a_proj"
    inputs = [_join(path, n) for n in (first, "kv_a_proj_with_mqa") if n in linears]
    return AttentionLayout(path, "latent", Heads(h.num_heads, h.num_heads, nope + rope), q, k, v, out, inputs)


def experts_module(block: nn.Module) -> str | None:
    """Path of the module holding stacked (3-D) expert weights in `block`, if any."""
    for path, module in block.named_modules():
        if any(p.dim() == 3 for p in module.parameters(recurse=False)):
            return path
    return None


def mlp_layout(config, block: nn.Module, attention: str) -> MlpLayout:
    """The MLP projections of `block` outside its attention module `attention`."""
    d = hidden_size(config)
    experts = experts_module(block)
    if experts is not None:
        return MlpLayout(experts=experts)
    prefix = f"{attention}."
    linears = {n: m for n, m in block.named_modules() if is_linear(m) and not n.startswith(prefix)
               and not n.endswith(".base_layer") and n != attention}
    by_leaf = {n.rsplit(".", 1)[-1]: n for n in linears}
    if {"gate_proj", "up_proj", "down_proj"} <= set(by_leaf):
        gate, up = (by_leaf[k] for k in ("gate_proj", "up_proj"))
        return MlpLayout(Columns(gate, ((0, linear_features(linears[gate])[1]),)),
                         Columns(up, ((0, linear_features(linears[up])[1]),)), by_leaf["down_proj"])
    if {"gate_up_proj", "down_proj"} <= set(by_leaf):  # Phi-3: gate | up, then down
        fused = by_leaf["gate_up_proj"]
        inner = linear_features(linears[by_leaf["down_proj"]])[0]
        if linear_features(linears[fused])[1] == 2 * inner:
            return MlpLayout(Columns(fused, ((0, inner),)), Columns(fused, ((inner, 2 * inner),)), by_leaf["down_proj"])
    ups = [n for n, m in linears.items() if linear_features(m)[0] == d and linear_features(m)[1] != d]
    downs = [n for n, m in linears.items() if linear_features(m)[1] == d and linear_features(m)[0] != d]
    if len(ups) == 1 and len(downs) == 1 and \
            linear_features(linears[ups[0]])[1] == linear_features(linears[downs[0]])[0]:
        return MlpLayout(up=Columns(ups[0], ((0, linear_features(linears[ups[0]])[1]),)), down=downs[0])
    return MlpLayout()
