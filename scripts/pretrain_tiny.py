"""Pretrain the small Llama behind `model=tiny_pretrained` on a generated corpus of our own.

The corpus (`peftrun/tasks/synthetic_world.py`) exercises skills the synthetic downstream tasks
reuse in other forms: copying spans, looking up facts stated in the context, one- to three-step
arithmetic (bare, worked, and in one-step stories), a few instruction formats, which adjectives
make people happy or sad, and everyday sentences that use the tasks' words. Documents (BOS +
text + EOS) are packed into windows of `--seq` tokens; the loss covers every token.

The run is a function of its arguments: the same seed gives the same weights on the same
machine (same thread count). The model and its tokenizer are written with
`save_pretrained` into a temporary folder that is renamed at the end, so an interrupted run
never leaves a folder that looks complete.

    python scripts/pretrain_tiny.py                            # models/tiny_pretrained (~13 min, 2 cores)
    python scripts/pretrain_tiny.py --out /tmp/tp --steps 3 --hidden 32 --layers 1   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting slow every process down many
# times over; sleeping waiters cost little when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "models" / "tiny_pretrained"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per window")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=None, help="default: hidden / 32")
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads / 2")
    p.add_argument("--intermediate", type=int, default=None, help="default: 8/3 hidden, a multiple of 16")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the final loss")
    p.add_argument("--probes", type=int, default=64, help="held-out prompts per skill for the accuracy report")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe",
                   help="char: peftrun's offline character tokenizer; bpe: trained on the corpus (default)")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    args = p.parse_args(argv)
    args.heads = args.heads or max(1, args.hidden // 32)
    args.kv_heads = args.kv_heads or max(1, args.heads // 2)
    args.intermediate = args.intermediate or max(16, round(args.hidden * 8 / 3 / 16) * 16)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    return args


def corpus_tokenizer(vocab_size: int, seed: int):
    """A byte-pair tokenizer trained on the corpus (seeded sample, deterministic): the world's
    names, words and numbers become one token each, with a leading space, so a document is about
    three times shorter than in characters. Every printable character stays a token, so any text
    is encodable; specials and BOS handling are those of peftrun's character tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from peftrun.models import BOS, CHARACTERS, EOS, PAD, UNK
    from peftrun.tasks.synthetic_world import NEGATIVE, PEOPLE, PLACES, POSITIVE, WORDS, corpus_documents

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Pieces never cross a word, number or symbol boundary ("####" is one symbol); a space sticks
    # to what follows it.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]+| ?#+| ?[^A-Za-z0-9\s]|\s"),
                                             behavior="isolated")
    tok.decoder = decoders.Fuse()
    docs = [d for _, d in itertools.islice(corpus_documents(seed + 2_000_003), 20000)]
    # Every world word and number 0..199 often enough to be merged whole.
    world = " ".join(PLACES + PEOPLE + WORDS + POSITIVE + NEGATIVE + [str(i) for i in range(200)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=CHARACTERS, show_progress=False)
    tok.train_from_iterator(docs + [world] * 5, trainer)
    vocab = tok.get_vocab()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)


def model_spec(args):
    """The ModelConfig that `peftrun.models.build_model` builds the untrained backbone from."""
    from peftrun.config import BuildSpec, ModelConfig

    build = BuildSpec(arch="llama", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                      max_position_embeddings=max(512, args.seq), seed=args.seed)
    return ModelConfig(name="tiny_pretrained", build=build)


def windows(documents, tokenizer, seq: int):
    """Pack BOS + document + EOS streams into windows of `seq` token ids, forever."""
    buffer: list[int] = []
    for _, text in documents:
        buffer += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
        while len(buffer) >= seq:
            yield buffer[:seq]
            buffer = buffer[seq:]


def heldout_batches(tokenizer, args) -> dict[str, "torch.Tensor"]:
    """Held-out windows (another corpus seed): all skills mixed, and each skill alone."""
    import torch

    from peftrun.tasks.synthetic_world import MIX, SKILLS, corpus_documents

    heldout_seed = args.seed + 1_000_003
    out = {"all": torch.tensor(list(itertools.islice(windows(corpus_documents(heldout_seed), tokenizer, args.seq),
                                                      args.eval_windows)))}
    per_skill = max(1, args.eval_windows // 4)
    for skill in (s for s in SKILLS if MIX.get(s)):
        docs = (d for d in corpus_documents(heldout_seed) if d[0] == skill)
        out[skill] = torch.tensor(list(itertools.islice(windows(docs, tokenizer, args.seq), per_skill)))
    return out


def lm_loss(model, ids) -> "torch.Tensor":
    import torch.nn.functional as F

    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def evaluate(model, batches, batch_size: int) -> dict[str, float]:
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for name, ids in batches.items():
            losses = [float(lm_loss(model, ids[i:i + batch_size])) * len(ids[i:i + batch_size])
                      for i in range(0, len(ids), batch_size)]
            out[name] = sum(losses) / len(ids)
    model.train()
    return out


def skill_accuracy(model, tokenizer, seed: int, n: int) -> dict[str, float]:
    """Greedy completions of held-out prompts in the corpus's forms: the share (0..100) that
    starts with the expected text, per skill."""
    from peftrun.generate import generate
    from peftrun.tasks.synthetic_world import skill_probes

    out = {}
    for skill, pairs in skill_probes(seed + 3_000_017, n).items():
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in pairs)
        predictions = generate(model, tokenizer, None, [p for p, _ in pairs], batch_size=64,
                               max_new_tokens=longest + 1, max_prompt_length=512)
        out[skill] = 100.0 * sum(p.startswith(t) for p, (_, t) in zip(predictions, pairs)) / len(pairs)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from peftrun.models import _quiet_progress, build_model, offline_tokenizer
    from peftrun.tasks.synthetic_world import corpus_documents

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = offline_tokenizer() if args.tokenizer == "char" else corpus_tokenizer(args.vocab, args.seed)
    model = build_model(model_spec(args), tokenizer)  # seeded init (build.seed), frozen: unfreeze
    model.requires_grad_(True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), ffn {args.intermediate}: {n_params:,} parameters; "
          f"{args.steps} steps x {args.batch} x {args.seq} tokens; torch threads {torch.get_num_threads()}",
          flush=True)

    # No weight decay on norms (their weights start at 1: decay would pull them towards 0).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:  # linear warm-up, cosine down to 10%
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    stream = windows(corpus_documents(args.seed), tokenizer, args.seq)
    heldout = heldout_batches(tokenizer, args)

    started = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        ids = torch.tensor(list(itertools.islice(stream, args.batch)))
        loss = lm_loss(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            tps = step * args.batch * args.seq / elapsed
            eta = elapsed / step * (args.steps - step)
            print(f"step {step}/{args.steps}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{tps:,.0f} tokens/s  {elapsed:.0f} s elapsed, ~{eta:.0f} s left", flush=True)
    train_seconds = time.perf_counter() - started

    losses = evaluate(model, heldout, args.batch)
    unit = "character" if args.tokenizer == "char" else "token"
    print(f"held-out LM loss {losses['all']:.4f} per {unit}; by skill: "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "all"), flush=True)
    skills = skill_accuracy(model, tokenizer, args.seed, args.probes)
    print("held-out skill accuracy (greedy, % exact): " + ", ".join(f"{k} {v:.0f}" for k, v in skills.items()),
          flush=True)

    out = Path(args.out).resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.requires_grad_(False)
    model.config.name_or_path = str(out)
    with _quiet_progress():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "tokens": args.steps * args.batch * args.seq,
        "train_seconds": round(train_seconds, 1),
        "heldout_loss": losses,
        "heldout_loss_unit": unit,
        "skill_accuracy": skills,
        "final_train_loss": running,
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"saved to {out} ({train_seconds:.0f} s of training)", flush=True)
    return info


if __name__ == "__main__":
    main()
