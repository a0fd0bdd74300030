"""Schemas of the shared config groups (model, task, trainer), registered in Hydra's ConfigStore;
each method's schema lives with the method and is registered with it (peftrun.methods).

Each option file in peftrun/conf/<group>/ names its schema in its defaults list (for example
`peftrun/conf/method/lora.yaml` starts from `lora_schema`), so an unknown key or a value of the wrong
type is refused while the config is composed, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# --------------------------------------------------------------------------------------- model
@dataclass
class BuildSpec:
    """Architecture of a backbone built from a config (random init, fixed seed, no download)."""

    arch: str = "llama"  # llama | gpt2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # llama only; fewer than num_heads gives grouped-query attention
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # A Hub id or a local folder for `from_pretrained`; leave null to build from `build`.
    name_or_path: Optional[str] = None
    build: Optional[BuildSpec] = None
    # null: the offline character tokenizer for built models, `name_or_path` otherwise.
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: Optional[str] = "sdpa"  # eager | sdpa | flash_attention_2 | null
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    quantization: Optional[str] = None  # null | nf4 | int8 (bitsandbytes)
    bnb_4bit_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "float32"
    # For a local folder made by a command of ours (e.g. `python scripts/pretrain_tiny.py`): when
    # `name_or_path` is missing, validation names this command instead of trying the Hub.
    create_command: Optional[str] = None


# ---------------------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING
    # Longest tokenized prompt + target kept; longer prompts are cut from the left, examples
    # whose target alone does not fit are dropped. Both are counted and reported.
    max_length: int = 256
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_new_tokens: int = 16
    # Also train on prompt tokens (the papers train on the answer only).
    loss_on_prompt: bool = False


@dataclass
class ToyTaskConfig(TaskConfig):
    """Offline synthetic task: an operation on a short list of digits, answered in digits."""

    name: str = "toy"
    ops: List[str] = field(default_factory=lambda: ["max", "min"])
    list_length: int = 4
    num_train: int = 2000
    num_dev: int = 200
    num_test: int = 200
    seed: int = 1234
    max_new_tokens: int = 4


@dataclass
class JsonlTaskConfig(TaskConfig):
    """Local JSON-lines files: one object per line, rendered through templates."""

    name: str = "jsonl"
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    # {field} placeholders over each record's fields, e.g. "Question: {question}\nAnswer:"
    # (field names only; {{ and }} are literal braces; a typed \n is a newline, \t a tab).
    prompt_template: str = "{prompt}"
    target_template: str = "{target}"
    metric: str = "exact_match"  # exact_match | contains


@dataclass
class ChatTaskConfig(TaskConfig):
    """Conversations ({"messages": [{"role", "content"}]} or ShareGPT {"conversations": [{"from",
    "value"}]}) from local json/jsonl/parquet files or a Hub dataset, rendered with the
    tokenizer's chat template; the loss covers assistant replies (peftrun/tasks/chat.py)."""

    name: str = "chat"
    train_file: Optional[str] = None
    dev_file: Optional[str] = None  # null: a dev set is held out of train
    test_file: Optional[str] = None  # null: test = dev
    # A Hub dataset in the same layout instead of local files (needs a network).
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    revision: Optional[str] = None
    train_split: str = "train"
    dev_split: Optional[str] = None
    test_split: Optional[str] = None
    # null: "messages" (role/content) or "conversations" (ShareGPT: from/value), whichever a
    # record has; set them for other field names.
    messages_field: Optional[str] = None
    role_field: Optional[str] = None
    content_field: Optional[str] = None
    # More role names, each mapped to system, user or assistant (human, gpt, model, ... are known).
    roles: Dict[str, str] = field(default_factory=dict)
    # A Jinja template (the string, or a path to a file); null: the tokenizer's, else ChatML.
    chat_template: Optional[str] = None
    train_on: str = "all_assistant"  # all_assistant | last_assistant
    metric: str = "exact_match"  # exact_match | rougeL
    # Skip (and count) records that are not valid conversations instead of stopping.
    skip_invalid: bool = False


@dataclass
class HubTaskConfig(TaskConfig):
    """A dataset from the Hugging Face Hub (`hub_id`, `hub_config`), or local files in the same
    schema (`data_files`), rendered through templates over the fields the task extracts."""

    name: str = MISSING
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    revision: Optional[str] = None
    # Local files instead of the Hub: one path (the train split) or {split_name: path(s)} with
    # the source's split names, e.g. {train: train.jsonl, validation: dev.jsonl}.
    # json/jsonl/csv/parquet by extension.
    data_files: Any = None
    train_split: str = "train"
    dev_split: Optional[str] = "validation"  # null: a dev set is held out of train
    test_split: Optional[str] = None  # used by split_recipe=original only; null: test = dev
    # paper: the ALoRA/PARA/IAPT recipe (under 10k training examples the original dev set is
    # halved into dev and test; otherwise 1k training examples become dev, the original dev is
    # test); original: the source's own splits.
    split_recipe: str = "paper"
    seed: int = 42  # the split recipe's shuffle
    # {field} placeholders over the task's fields (each task's yaml lists them).
    prompt_template: str = MISSING
    target_template: str = MISSING
    source_lang: Optional[str] = None  # translation tasks
    target_lang: Optional[str] = None


@dataclass
class SyntheticTaskConfig(TaskConfig):
    """Offline tasks over the invented world the `tiny_pretrained` backbone was pretrained on
    (synth_qa, synth_math, synth_sentiment), in forms its corpus never used."""

    name: str = MISSING
    num_train: int = 2000
    num_dev: int = 200
    num_test: int = 200
    seed: int = 1234


# -------------------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """The base of every method's schema; each method's own lives beside its code
    (peftrun/methods/<name>/config.py) and is registered with the method."""

    name: str = MISSING


# ------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    seed: int = 0
    # Training length: max_steps when > 0, otherwise epochs over the training set.
    max_steps: int = -1
    epochs: float = 1.0
    micro_batch_size: int = 16
    grad_accum: int = 1
    # Each micro-batch's examples concatenated into rows of at most task.max_length tokens, with
    # attention kept inside each example: the same examples and gradient, far less padding.
    packing: bool = False
    # Each global batch drawn from examples of similar length (sorted within windows of 50
    # batches, the batches shuffled): less padding without packing, still a function of the step.
    group_by_length: bool = False
    eval_batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "linear"  # linear | cosine | constant (each after warm-up)
    warmup_ratio: float = 0.06
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Optimizer steps whose loss or gradient norm is not finite that are skipped (their update
    # dropped) before the run stops; 0: the first one stops the run. NaN is never saved.
    max_nonfinite_skips: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # Dev loss every N optimizer steps (0: only at the end); it drives early stopping and the
    # best checkpoint.
    eval_every: int = 0
    # Generation-based dev metric every N steps, a multiple of eval_every (0: test set at the end only).
    generate_every: int = 0
    num_beams: int = 1
    early_stopping_patience: int = 0  # evaluations without improvement; 0 disables
    load_best_at_end: bool = True
    save_every: int = 0  # checkpoint every N steps; 0: only at the end
    save_total_limit: int = 2
    # Start from a saved adapter (a run, checkpoint or adapter folder of the same method and
    # shapes): its tensors are loaded once the adapter is attached, before the first step.
    init_from: Optional[str] = None
    # Resume from this checkpoint folder (.../checkpoints/step-N, verified by its manifest, of a
    # run with the same config) instead of the run folder's newest; newer ones there are set aside.
    resume_from: Optional[str] = None
    # metrics.jsonl, the trackers and the console's plain progress lines (no terminal) every N steps.
    log_every: int = 10
    progress: bool = True  # the progress display: a bar on a terminal, a line every log_every steps elsewhere
    # Experiment trackers through Accelerate (main process): a list of tensorboard, wandb, mlflow,
    # ... (one name alone also works); each needs its package (`pip install peftrun[tensorboard]`).
    # docs/monitoring.md. Read it through `tracker_names`.
    report_to: Any = field(default_factory=list)
    # Expected number of processes; the run refuses to start under another world size.
    num_processes: Optional[int] = None
    # ddp: every process holds the whole backbone. fsdp: the frozen backbone and the adapter are
    # sharded over the processes (FSDP2 through Accelerate's plugin), one unit per decoder layer.
    strategy: str = "ddp"


def tracker_names(trainer: Any) -> list[str]:
    """trainer.report_to as a list of names (`trainer.report_to=wandb` is `[wandb]`)."""
    value = getattr(trainer, "report_to", None) or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass
class Config:
    model: Any = MISSING
    task: Any = MISSING
    method: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="peftrun_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="task", name="toy_schema", node=ToyTaskConfig)
    cs.store(group="task", name="jsonl_schema", node=JsonlTaskConfig)
    cs.store(group="task", name="chat_schema", node=ChatTaskConfig)
    cs.store(group="task", name="hub_schema", node=HubTaskConfig)
    cs.store(group="task", name="synthetic_schema", node=SyntheticTaskConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)


register_configs()
