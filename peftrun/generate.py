"""Batched generation through the LM head: evaluation, and multi-tenant inference (one backbone,
a batch whose requests each name their adapter).

    peftrun-generate outputs/RUN --prompt "max 3815="                  # the run's adapter
    peftrun-generate outputs/RUN --adapter b=outputs/RUN_B --prompts-file requests.jsonl
    python -m peftrun.generate outputs/RUN --prompt "max 3815=" --output completions.jsonl

Each line of a prompts file is {"prompt": "...", "adapter": "b"}: "adapter" names a loaded
adapter, null for the backbone alone; without it, the request goes to the positional run's
adapter (named "default"), or to the backbone when there is none. Output lines (stdout or
--output) are {"prompt", "adapter", "completion"}, in the order of the requests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .data import encode_prompts
from .errors import ConfigError, fail


@torch.no_grad()
def generate(
    model,
    tokenizer,
    adapter: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    max_prompt_length: int = 256,
    synced: bool = False,
) -> list[str]:
    """Greedy (or beam) completions of `prompts`, left-padded in batches, stopping at EOS.
    The adapter learns each batch's prompt positions before the forward passes. `synced`: a
    sharded model on several processes; each keeps stepping until all have finished."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode_prompts(list(prompts[start : start + batch_size]), tokenizer, max_prompt_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            if adapter is not None:
                adapter.set_prompt_mask(batch["prompt_mask"])
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        if adapter is not None:
            adapter.set_prompt_mask(None)
        model.train(was_training)
    return outputs


class Router:
    """Mixed-tenant batches over adapters of several methods on one backbone. Each method's
    `routing` covers every adapter of that method (LoRA and ALoRA share theirs); the router
    gives each method the rows it owns and None (the backbone) elsewhere, so a row goes
    through exactly one adapter."""

    def __init__(self, adapters: Iterable[Any]):
        by_kind: dict[Any, Any] = {}  # one adapter per routing mechanism (LoRA and ALoRA share one)
        for adapter in adapters:
            by_kind.setdefault(type(adapter).routing, adapter)
        self.families = list(by_kind.values())
        self.owners: dict[str, Any] = {}  # adapter name -> the adapter whose routing covers it
        for family in self.families:
            for name in family.tenants():
                owner = self.owners.setdefault(name, family)
                if owner is not family:
                    raise ValueError(f"two adapters on this model are named {name!r} ({owner.method} and "
                                     f"{family.method}); load them under names of their own")

    def tenants(self) -> list[str]:
        return list(self.owners)

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        for family in self.families:
            family.set_prompt_mask(prompt_mask)

    @contextlib.contextmanager
    def routing(self, names: Sequence[str | None]):
        unknown = [n for n in names if n is not None and n not in self.owners]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} on this model (have: {', '.join(self.owners)})")
        with contextlib.ExitStack() as stack:
            for family in self.families:
                stack.enter_context(family.routing([n if n is not None and self.owners[n] is family else None
                                                    for n in names]))
            yield


@torch.no_grad()
def generate_mixed(
    model,
    tokenizer,
    router: Any,
    requests: Sequence[tuple[str, str | None]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    max_prompt_length: int = 256,
) -> list[str]:
    """Completions of (prompt, adapter name) requests in shared batches: `router.routing(names)`
    sends each batch row through its request's adapter (None: the backbone). `router` is an
    adapter (its routing covers every adapter of its method on the backbone), a Router, or a
    list of adapters (of one method or several). Beams of a request share its adapter."""
    if isinstance(router, (list, tuple)):
        router = Router(router)
    outputs: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        names = [name for _, name in chunk for _ in range(num_beams)]
        with router.routing(names):
            outputs += generate(model, tokenizer, router, [prompt for prompt, _ in chunk], batch_size=len(chunk),
                                max_new_tokens=max_new_tokens, num_beams=num_beams,
                                max_prompt_length=max_prompt_length)
    return outputs


# ----------------------------------------------------------------------------- serving saved adapters
PROG = "peftrun-generate"
DEFAULT_ADAPTER = "default"
# Attach order: IAPT's generators hold linear layers that an "all-linear" LoRA attached after
# them would wrap, so IAPT comes last.
LOAD_ORDER = ("lora", "alora", "tied_lora", "para", "iapt")
# Methods that wrap the backbone's projections, by the wrapper they use: adapters with
# different wrappers cannot share a backbone (LoRA and ALoRA share theirs; PARA and IAPT use hooks).
WRAPPERS = {"lora": "LoRA", "alora": "LoRA", "tied_lora": "Tied-LoRA"}
# What makes two backbones the same one (dtype, quantization and attention kernel may differ).
BACKBONE_KEYS = ("name", "name_or_path", "build", "revision", "tokenizer")


@dataclass
class SavedAdapter:
    name: str
    folder: Path  # holds adapter_config.json and the tensors
    method: str
    base_model: str | None  # the backbone's model.name, as saved with the adapter
    model_config: dict | None  # the `model` section of the run's config.yaml (None: not found)
    task_config: dict | None


def locate_adapter(name: str, path: str | os.PathLike) -> SavedAdapter:
    """A saved adapter from a run folder (its adapter/), a checkpoint folder or an adapter
    folder, with the config.yaml of the run that trained it (next to it or one level up)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("adapter", f"{path} does not exist; give a run folder (outputs/RUN) or a saved adapter folder")
    from omegaconf import OmegaConf

    from .methods import ADAPTER_CONFIG, read_adapter_config

    folder = path if (path / ADAPTER_CONFIG).is_file() else path / "adapter"
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError("adapter", f"{path} holds no saved adapter (no {ADAPTER_CONFIG} in it or in adapter/); "
                                     f"give the folder of a run that finished, or an adapter folder")
    saved = read_adapter_config(folder)
    config = next((d / "config.yaml" for d in (folder, folder.parent) if (d / "config.yaml").is_file()), None)
    model_cfg = task_cfg = None
    if config is not None:
        run = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        model_cfg, task_cfg = run.get("model"), run.get("task")
    return SavedAdapter(name, folder, str(saved.get("method")), saved.get("base_model"), model_cfg, task_cfg)


def check_compatible(adapters: list[SavedAdapter]) -> dict:
    """The backbone config every adapter was trained on; refuses adapters of different
    backbones, adapters whose backbone is unknown, and methods that cannot share one."""
    if not adapters:
        raise ConfigError("adapter", "give a run folder or --adapter NAME=DIR: there is no backbone to build")
    names = [a.name for a in adapters]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError("adapter", f"the name {repeated[0]!r} is given twice; name each adapter once")
    wrappers = sorted({WRAPPERS[a.method] for a in adapters if a.method in WRAPPERS})
    if len(wrappers) > 1:
        raise ConfigError("adapter", f"{' and '.join(wrappers)} adapters cannot share one backbone (both wrap "
                                     f"the attention projections); serve them in separate runs")
    configured = [a for a in adapters if a.model_config is not None]
    if not configured:
        raise ConfigError("adapter", f"no config.yaml next to {adapters[0].folder} or its parent, so its "
                                     f"backbone is unknown; give the run folder")
    first = configured[0]

    def identity(model: dict) -> dict:
        return {k: model.get(k) for k in BACKBONE_KEYS}

    for a in adapters:
        if a.model_config is None:
            if a.base_model is None or a.base_model != first.model_config.get("name"):
                raise ConfigError("adapter", f"{a.name} ({a.folder}) has no config.yaml near it and was saved "
                                             f"for backbone {a.base_model!r}, not {first.model_config.get('name')!r}; "
                                             f"give its run folder")
        elif identity(a.model_config) != identity(first.model_config):
            diff = next(k for k in BACKBONE_KEYS if a.model_config.get(k) != first.model_config.get(k))
            raise ConfigError("adapter", f"{a.name} ({a.folder}) was trained on another backbone than "
                                         f"{first.name} (model.{diff}: {a.model_config.get(diff)!r} vs "
                                         f"{first.model_config.get(diff)!r}); one batch needs one backbone")
    return first.model_config


def load_tenants(adapters: dict[str, str | os.PathLike], device: str | torch.device | None = None):
    """Rebuild the backbone the saved adapters were trained on and attach each under its name.
    `adapters` maps a name to a run, checkpoint or adapter folder. Returns (model, tokenizer,
    router, task config of the first run or None); `generate_mixed(model, tokenizer, router,
    [(prompt, name), ...])` then serves them in shared batches."""
    from omegaconf import OmegaConf

    from .config import ModelConfig
    from .methods import load_adapter
    from .models import build_model, load_tokenizer

    saved = [locate_adapter(name, path) for name, path in adapters.items()]
    model_section = check_compatible(saved)
    try:
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_section)
    except Exception as e:  # a config.yaml from an incompatible peftrun version
        raise ConfigError("model", f"the run's model config does not load ({' '.join(str(e).split())})") from e
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_cfg)
    model = build_model(model_cfg, tokenizer, device=device)
    if model_cfg.quantization is None:
        model.to(device)
    loaded = []
    for a in sorted(saved, key=lambda a: LOAD_ORDER.index(a.method) if a.method in LOAD_ORDER else len(LOAD_ORDER)):
        try:
            loaded.append(load_adapter(a.folder, model, adapter_name=a.name))
        except ValueError as e:  # tensors that do not fit this backbone
            raise ConfigError("adapter", f"{a.name} ({a.folder}) does not fit the backbone: {e}") from e
    task = next((a.task_config for a in saved if a.task_config is not None), None)
    return model, tokenizer, Router(loaded), task


def read_requests(path: Path, default: str | None) -> list[tuple[str, str | None]]:
    """(prompt, adapter name) from a JSON-lines file of {"prompt", "adapter" (optional)}."""
    if not path.is_file():
        raise ConfigError("prompts-file", f"{path} does not exist")
    requests = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("prompts-file", f"line {lineno} of {path} is not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError("prompts-file", f"line {lineno} of {path} needs a \"prompt\" string")
        name = row.get("adapter", default)
        if name is not None and not isinstance(name, str):
            raise ConfigError("prompts-file", f"line {lineno} of {path}: \"adapter\" is a name or null")
        requests.append((row["prompt"], name))
    if not requests:
        raise ConfigError("prompts-file", f"{path} holds no request")
    return requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.error = lambda message: fail(ValueError(message), PROG)  # one line, exit 2
    parser.add_argument("run", nargs="?", help=f"a run folder (or adapter folder): its adapter, named {DEFAULT_ADAPTER!r}")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="one more adapter (run or adapter folder) under NAME; repeatable")
    requests = parser.add_mutually_exclusive_group(required=True)
    requests.add_argument("--prompt", action="append", metavar="TEXT",
                          help=f"a prompt for the {DEFAULT_ADAPTER!r} adapter (the backbone without one); repeatable")
    requests.add_argument("--prompts-file", type=Path, metavar="FILE.jsonl",
                          help='requests, one JSON object a line: {"prompt": ..., "adapter": NAME or null}')
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's task.max_new_tokens")
    parser.add_argument("--max-prompt-length", type=int, help="prompts are cut from the left to this many "
                                                              "tokens; default: the run's task.max_length")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="requests per shared batch")
    parser.add_argument("--output", type=Path, metavar="FILE.jsonl", help="default: standard output")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    for flag in ("max_new_tokens", "max_prompt_length", "num_beams", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return args


def serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    adapters: dict[str, str] = {}
    if args.run is not None:
        adapters[DEFAULT_ADAPTER] = args.run
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError("adapter", f"expected NAME=DIR, got {spec!r}")
        if name in adapters:
            raise ConfigError("adapter", f"the name {name!r} is given twice; name each adapter once")
        adapters[name] = folder
    default = DEFAULT_ADAPTER if args.run is not None else None
    if args.prompts_file is not None:
        requests = read_requests(args.prompts_file, default)
    else:
        requests = [(p, default) for p in args.prompt]
    for i, (_, name) in enumerate(requests, start=1):
        if name is not None and name not in adapters:
            raise ConfigError("adapter", f"request {i} names adapter {name!r}, which is not given (given: "
                                         f"{', '.join(adapters) or 'none'}; null means the backbone)")
    model, tokenizer, router, task = load_tenants(adapters, args.device)
    task = task or {}
    completions = generate_mixed(
        model, tokenizer, router, requests, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens or task.get("max_new_tokens") or 16,
        max_prompt_length=args.max_prompt_length or task.get("max_length") or 256,
    )
    return [{"prompt": p, "adapter": n, "completion": c} for (p, n), c in zip(requests, completions)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        rows = serve(args)
    except ConfigError as e:
        fail(e, PROG)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(text)
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
