"""Exports: an adapter in Hugging Face PEFT's format, or merged into a plain backbone.

`export_peft` writes `adapter_model.safetensors` + `adapter_config.json` that
`peft.PeftModel.from_pretrained(backbone, folder)` loads. A method opts in by overriding its
adapter's `peft_state()` (peftrun.methods.base.Adapter), returning `(peft_config, tensors)`:

* `peft_config`: the fields of the PEFT config class, `peft_type` included (e.g. "LORA"); the
  exporter adds `base_model_name_or_path` and, unless given, `task_type` ("CAUSAL_LM");
* `tensors`: keyed as in PEFT's file, `base_model.model.<module>.<tensor>` with no adapter name.

`merge_into_backbone` folds the adapter into the backbone weights and removes the adapter's
modules (the adapter's `unload`), so `model.save_pretrained` writes a checkpoint that loads
without peftrun or PEFT.
peft is not imported here: it is not a runtime dependency.

The `peftrun-export` command does both for a saved run:

    peftrun-export outputs/RUN --peft exports/run-peft       # PEFT adapter (LoRA, Tied-LoRA, ALoRA)
    peftrun-export outputs/RUN --merged exports/run-merged   # full model + tokenizer (save_pretrained)

RUN is a run, checkpoint or adapter folder (with the run's config.yaml next to it or one level
up). The folder is written under a temporary name and renamed into place; an existing one is
replaced only if it holds an earlier export of the same kind.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from torch import nn

from .errors import ConfigError, fail
from .methods import Adapter
from .methods.io import replace_dir, write_folder_atomically

PEFT_TASK_TYPE = "CAUSAL_LM"
PROG = "peftrun-export"


def export_peft(adapter: Adapter, model_name_or_path: str, folder: str | os.PathLike) -> Path:
    """Write `adapter` into `folder` in PEFT's format (atomically: a temporary sibling, then a
    rename). `model_name_or_path` is the backbone PEFT should load it onto (a Hub id or folder)."""
    config, tensors = adapter.peft_state()  # refuses for a method without a PEFT form
    config = dict(config)
    if "peft_type" not in config:
        raise ValueError(f"{type(adapter).__name__}.peft_state() gave a config without peft_type")
    config.setdefault("task_type", PEFT_TASK_TYPE)
    config["base_model_name_or_path"] = model_name_or_path
    bad = [k for k in tensors if not k.startswith("base_model.model.")]
    if bad:
        raise ValueError(f"PEFT tensor names start with 'base_model.model.', got {bad[:3]}")
    return write_folder_atomically(folder, {k: t.detach().contiguous().cpu() for k, t in tensors.items()}, config)


def merge_into_backbone(adapter: Adapter, model: nn.Module) -> nn.Module:
    """Merge `adapter` into `model`'s weights and replace its wrappers by the layers they wrap;
    returns `model` (changed in place). The adapter is unusable afterwards. Quantized backbones
    and non-linear methods (PARA, IAPT) are refused before anything changes."""
    return adapter.unload(model)


# ----------------------------------------------------------------------------- peftrun-export
# The files that mark a folder as an earlier export of each kind (it may be replaced).
EXPORT_MARKERS = {"peft": "adapter_config.json", "merged": "config.json"}


def check_export_folder(folder: Path, kind: str, run_dir: Path) -> None:
    """`folder` is new (or empty, or an earlier export of the same kind) and neither the run
    folder, inside its adapter, nor above the run."""
    out, run = folder.expanduser().absolute(), run_dir.expanduser().absolute()
    if out == run or out in run.parents or (run / "adapter") in (out, *out.parents):
        raise ConfigError(kind, f"{folder} would replace the run folder {run_dir} or its adapter; give a "
                                f"folder of its own, e.g. --{kind} exports/NAME")
    if out.exists() and not out.is_dir():
        raise ConfigError(kind, f"{folder} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKERS[kind]).is_file():
        raise ConfigError(kind, f"{folder} exists and holds other files; give a new folder (an earlier "
                                f"--{kind} export there is replaced)")


def base_model_id(model_cfg: dict) -> str:
    """What PEFT's `base_model_name_or_path` names: the backbone's Hub id or (absolute) folder;
    `peftrun/<name>` for a backbone peftrun builds from a config."""
    source = model_cfg.get("name_or_path")
    if not source:
        return f"peftrun/{model_cfg.get('name')}"
    path = Path(source).expanduser()
    return str(path.absolute()) if path.is_dir() else source


def export_run(run: str | os.PathLike, peft: str | os.PathLike | None = None,
               merged: str | os.PathLike | None = None, device: str | None = None,
               trust_remote_code: bool = False) -> Path:
    """Export the adapter of a saved run in PEFT's format (`peft`) or merged into a full model
    folder that `AutoModelForCausalLM.from_pretrained` loads, with the tokenizer (`merged`).
    Everything that can be refused is refused before weights load."""
    from .methods import method_class
    from .multitenant import load_tenants, locate_adapter

    kind, folder = ("peft", Path(peft)) if peft is not None else ("merged", Path(merged))
    saved = locate_adapter("default", run)
    adapter_class = method_class(saved.method, "adapter").adapter_class
    if kind == "peft" and adapter_class.peft_state is Adapter.peft_state:
        raise ConfigError("peft", f"method {saved.method} has no PEFT format (lora, tied_lora and alora "
                                  f"have); serve it with peftrun-generate, or load it in Python with "
                                  f"peftrun.methods.load_adapter")
    if kind == "merged" and not adapter_class.supports_merge:
        raise ConfigError("merged", f"method {saved.method} is not linear and cannot be merged into the "
                                    f"weights (lora, tied_lora and alora can); serve it with peftrun-generate")
    model_cfg = saved.model_config or {}
    if kind == "merged" and model_cfg.get("quantization"):
        raise ConfigError("merged", f"the backbone is quantized (model.quantization="
                                    f"{model_cfg['quantization']}) and cannot take merged weights; export "
                                    f"--peft and merge onto an unquantized backbone")
    run_dir = saved.folder.parent if saved.folder.name == "adapter" else saved.folder
    check_export_folder(folder, kind, run_dir)
    model, tokenizer, router, _ = load_tenants({"default": run}, device or "cpu",
                                               trust_remote_code=trust_remote_code)
    adapter = router.owners["default"]
    if kind == "peft":
        return export_peft(adapter, base_model_id(model_cfg), folder)
    try:
        merge_into_backbone(adapter, model)
    except ValueError as e:
        raise ConfigError("merged", " ".join(str(e).split())) from None
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    doc = __doc__.split("The `peftrun-export` command")[1]
    parser = argparse.ArgumentParser(prog=PROG, description="Export a saved run's adapter: in Hugging Face "
                                     "PEFT's format, or merged into a full model folder.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The `peftrun-export` command" + doc)
    parser.error = lambda message: fail(ValueError(message), PROG)  # one line, exit 2
    parser.add_argument("run", help="a run folder (outputs/RUN), checkpoint folder or adapter folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--peft", metavar="DIR", help="write a PEFT adapter folder (LoRA, Tied-LoRA, ALoRA)")
    what.add_argument("--merged", metavar="DIR", help="write the backbone with the adapter merged, and its "
                                                      "tokenizer (save_pretrained)")
    parser.add_argument("--device", help="where to load and merge (default: cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the backbone run code of its own (never taken from config.yaml)")
    args = parser.parse_args(argv)
    try:
        folder = export_run(args.run, args.peft, args.merged, args.device, args.trust_remote_code)
    except ConfigError as e:
        if e.key == "model.trust_remote_code":
            e = ConfigError("trust-remote-code", "the backbone ships code of its own; pass --trust-remote-code "
                                                 "to run it, if you trust it")
        fail(e, PROG)
    print(f"{PROG}: wrote {folder} ({'PEFT adapter' if args.peft else 'merged model'})")


__all__ = ["export_peft", "export_run", "merge_into_backbone"]


if __name__ == "__main__":
    main()
