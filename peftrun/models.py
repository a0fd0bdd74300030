"""Backbones and tokenizers: built from a config (offline, seeded) or loaded with `from_pretrained`.

Every model comes back frozen (eval mode, no parameter requires grad): methods add the trainable
parameters afterwards. `meta_model` gives the same module tree without weights, so adapter targets
can be checked before anything large is loaded.

The checks that need no weights (validate_model_config, ...) are model_checks.py's.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from typing import Iterator, Optional, Union

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from peftrun.config import ModelConfig
from peftrun.errors import ConfigError
from peftrun.model_checks import ARCHS, DTYPES, check_local_folder, validate_model_config


PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Printable ASCII (space through "~") plus newline and tab: enough for prompts and answers.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    # bitsandbytes' int8 matmul logs a warning on every call of every layer whose input is not
    # float16; the cast is expected, and the flood would bury the training log.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_warning)


# ------------------------------------------------------------------------------------ tokenizer
def offline_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code: ids are fixed, nothing is read or downloaded."""
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK] + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One piece per character; `[\s\S]` because `.` does not match a newline in Oniguruma.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join pieces with nothing between them, so spaces survive
    # BOS in front of every sequence, as Llama's tokenizer does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # The default clean-up would eat the space in " ." and break decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """The offline tokenizer for built models, else `cfg.tokenizer` or `cfg.name_or_path`."""
    if cfg.build is not None and cfg.tokenizer is None:
        return offline_tokenizer()
    if cfg.tokenizer is None:
        check_local_folder(cfg)
    source = cfg.tokenizer or cfg.name_or_path
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    with _load_errors(key, source):
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    # Batches need padding; most causal LMs (GPT-2, Llama) ship without a pad token.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(key, f"{source!r} has neither a pad nor an eos token; use another tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------- models
def model_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    """The architecture config: built from `cfg.build`, or fetched (config only) from the Hub."""
    spec = cfg.build
    if spec is None:
        with _load_errors("model.name_or_path", cfg.name_or_path):
            return AutoConfig.from_pretrained(
                cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "llama":
        return LlamaConfig(
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=False,
            **ids,
        )
    if spec.arch == "gpt2":
        return GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            n_positions=spec.max_position_embeddings,
            **ids,
        )
    raise ConfigError("model.build.arch", f"{spec.arch!r} is not one of {' | '.join(ARCHS)}")


def build_model(
    cfg: ModelConfig, tokenizer, device: Optional[Union[str, torch.device]] = None
) -> PreTrainedModel:
    """A frozen causal LM in eval mode.

    Unquantized models are returned on the CPU (the caller moves them). Quantized ones cannot be
    moved after loading, so they are loaded onto `device`: by default the current CUDA device when
    there is one, else the CPU; under Accelerate pass `accelerator.device`.
    """
    validate_model_config(cfg)
    if cfg.build is not None:
        model = _build_from_spec(cfg, tokenizer, device)
    else:
        model = _load_pretrained(cfg, device)

    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(
            "model.tokenizer",
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}; use the model's own tokenizer",
        )
    # Hub checkpoints often lack a pad id; generation needs the one the tokenizer pads with.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if cfg.quantization == "nf4":
        _keep_4bit_layout(model)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = True
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def meta_model(cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """The same module tree on the `meta` device: no weights are allocated or loaded.

    Quantized layers are not substituted (names match `build_model`, layer classes may not).
    """
    validate_model_config(cfg)
    config = model_config(cfg, tokenizer)
    # Eager attention: module names do not depend on it and it needs no optional package.
    with torch.device("meta"), _load_errors("model.name_or_path", cfg.name_or_path or cfg.name):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.dtype], attn_implementation="eager", trust_remote_code=cfg.trust_remote_code
        )
    model.requires_grad_(False)
    return model


def output_head_names(model: torch.nn.Module) -> set[str]:
    """Module names of the LM output head (e.g. {"lm_head"}), which "all-linear" must skip."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names = {name for name, module in model.named_modules() if module is head}
        if names:
            return names
    return {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"}


# ------------------------------------------------------------------------------------- helpers
def _build_from_spec(cfg: ModelConfig, tokenizer, device) -> PreTrainedModel:
    config = model_config(cfg, tokenizer)
    attn = _attn_kwargs(cfg)
    # Always initialised in float32 so a spec gives the same weights whatever dtype or
    # quantization is asked for; fork_rng leaves the caller's random stream untouched.
    with torch.random.fork_rng(devices=[]), _attn_errors():
        torch.manual_seed(cfg.build.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **attn)
    if cfg.quantization is None:
        model = model.to(DTYPES[cfg.dtype])
        model.config.dtype = DTYPES[cfg.dtype]  # `to` leaves the config (and a saved config.json) behind
        return model
    # bitsandbytes quantizes while loading weights, so round-trip through a temporary checkpoint.
    with tempfile.TemporaryDirectory(prefix="peftrun-build-") as folder, _quiet_progress():
        model.save_pretrained(folder)
        with _attn_errors():
            model = AutoModelForCausalLM.from_pretrained(folder, **attn, **_quantized_kwargs(cfg, device))
    model.config.name_or_path = ""  # not the deleted temporary folder
    return model


def _load_pretrained(cfg: ModelConfig, device) -> PreTrainedModel:
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **_attn_kwargs(cfg))
    if cfg.quantization is None:
        kwargs["dtype"] = DTYPES[cfg.dtype]
    else:
        kwargs.update(_quantized_kwargs(cfg, device))
    with _load_errors("model.name_or_path", cfg.name_or_path):
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)


def _attn_kwargs(cfg: ModelConfig) -> dict:
    # null keeps transformers' default (sdpa where available).
    return {} if cfg.attn_implementation is None else {"attn_implementation": cfg.attn_implementation}


def _quantized_kwargs(cfg: ModelConfig, device) -> dict:
    if cfg.quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    # dtype applies to what stays unquantized (embeddings, norms, output head).
    return {"quantization_config": quant, "device_map": {"": str(device)}, "dtype": DTYPES[cfg.dtype]}


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit layers. On CPUs with AVX512-BF16 it repacks
    a layer's weights at its first forward in eval mode without gradients (our dev-loss
    evaluation), rounding the block scales to bf16; from then on no gradient flows back through
    the layer, so the adapters below it stop learning."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _enable_checkpointing(model: PreTrainedModel) -> None:
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed it; `gradient_checkpointing_enable` is a deprecated alias there.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With a frozen backbone nothing before the first adapter needs grad, so recomputed blocks
    # would see no grad-requiring input; newer transformers adds this hook itself.
    if not getattr(model, "_require_grads_hooks", None) and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")


def _attn_error(err: BaseException) -> Optional[ConfigError]:
    line = _first_line(err)
    if "scaled_dot_product_attention" in line:  # sdpa is what failed (Gemma 2, Bloom, GPT-OSS): eager runs
        model = line.split(" does not support", 1)[0]
        return ConfigError("model.attn_implementation",
                           f"{model} does not support sdpa attention; try model.attn_implementation=eager")
    if "attn_implementation" in line or "FlashAttention" in line:
        return ConfigError("model.attn_implementation", f"{line}; try model.attn_implementation=sdpa")
    return None


@contextlib.contextmanager
def _attn_errors() -> Iterator[None]:
    """An attention implementation that cannot run here (e.g. flash_attention_2 without the package)."""
    try:
        yield
    except (ValueError, ImportError) as err:
        raise (_attn_error(err) or err) from err


@contextlib.contextmanager
def _load_errors(key: str, source) -> Iterator[None]:
    """Turn the errors of fetching a config, tokenizer or checkpoint into one-line ConfigErrors."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as err:
        line = _first_line(err)
        if (attn := _attn_error(err)) is not None:
            raise attn from err
        if "trust_remote_code" in line or "contains custom code" in str(err):
            raise ConfigError(
                "model.trust_remote_code",
                f"{source!r} ships its own code; set model.trust_remote_code=true if you trust it",
            ) from err
        raise ConfigError(
            key, f"{source!r} cannot be loaded ({line}); check the id or point it at a local folder"
        ) from err


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    # The save/reload of a tiny built model is an implementation detail: no progress bars.
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
