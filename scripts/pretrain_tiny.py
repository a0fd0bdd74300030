"""Pretrain the small Llama behind `model=tiny_pretrained` on a generated corpus of our own.

The corpus (`scripts/synthetic_corpus.py`) exercises skills the synthetic downstream tasks
reuse in other forms: copying spans, looking up facts stated in the context, one- to three-step
arithmetic (bare, worked, and in stories, worked out when they have several steps), a few
instruction formats, which adjectives make people happy or sad, and everyday sentences that use
the tasks' words. Documents (BOS + text + EOS) are packed into windows of `--seq` tokens; the
loss covers every token.

Two data-parallel processes of one thread each share every batch (`--procs`, DDP over gloo).
One thread per process needs no OpenMP team, so the speed does not hang on how idle threads
wait: as fast as one two-thread process whose threads spin (OMP_WAIT_POLICY=ACTIVE), 1.3-1.5x
faster than one whose threads sleep (PASSIVE, the default here: spinning threads slow a shared
machine many times over). The run is a function of its arguments: the same seed and `--procs`
give the same weights on the same machine; other machines and library versions round floats
differently, and the weights differ (the held-out loss and skills by little). The model and
its tokenizer are written with `save_pretrained` into a temporary folder that is renamed at
the end, so an interrupted run never leaves a folder that looks complete.

    python scripts/pretrain_tiny.py                            # models/tiny_pretrained (13-22 min, 2 cores)
    python scripts/pretrain_tiny.py --out /tmp/tp --steps 3 --hidden 32 --layers 1   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting slow every process down many
# times over. Sleeping waiters cost a process with two threads about a third of its speed
# (`--procs 1`), and nothing to the default one thread per process. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "models" / "tiny_pretrained"

# Beside this script (its folder is on sys.path whenever this module is run or imported by name).
from synthetic_corpus import MIX, SKILLS, corpus_documents, skill_probes  # noqa: E402


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
    p.add_argument("--procs", type=int, default=2,
                   help="data-parallel processes, each with a share of every batch (default: %(default)s; "
                        "the weights depend on it by the order of float additions only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: 1 with --procs > 1, else torch's choice)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe",
                   help="char: peftrun's offline character tokenizer; bpe: trained on the corpus (default)")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    args = p.parse_args(argv)
    if args.procs < 1 or args.batch % args.procs:
        p.error(f"--procs {args.procs}: give a number of processes that divides --batch {args.batch}")
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
    from peftrun.tasks.synthetic_world import NEGATIVE, PEOPLE, PLACES, POSITIVE, WORDS

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

    out = {}
    for skill, pairs in skill_probes(seed + 3_000_017, n).items():
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in pairs)
        predictions = generate(model, tokenizer, None, [p for p, _ in pairs], batch_size=64,
                               max_new_tokens=longest + 1, max_prompt_length=512)
        out[skill] = 100.0 * sum(p.startswith(t) for p, (_, t) in zip(predictions, pairs)) / len(pairs)
    return out


def global_mean(value: float, world: int) -> float:
    """The mean of `value` over the processes."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / world


def check_replicas_agree(model) -> None:
    """Every process took the same steps from the same initialization; a difference here means
    the all-reduce gave them different sums."""
    import torch
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(f"data-parallel replicas diverged (weight sums {low.item()!r} vs {high.item()!r})")


def pretrain(rank: int, world: int, args, tokenizer, folder: Path, rendezvous: str | None) -> None:
    """One process's part of the run: `world` processes each take `--batch / world` windows of
    every step's batch and average their gradients, so the steps are those of one process on the
    whole batch. The first process then evaluates and writes the model and pretrain.json into
    `folder`."""
    import torch
    import torch.distributed as dist

    from peftrun.models import _quiet_progress, build_model

    if args.threads or world > 1:  # small matrices: one thread per process beats two in one
        torch.set_num_threads(args.threads or 1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    main_process = rank == 0
    torch.manual_seed(args.seed)
    model = build_model(model_spec(args), tokenizer)  # seeded init (build.seed), frozen: unfreeze
    model.requires_grad_(True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if main_process:
        print(f"pretrain: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
              f"({args.kv_heads} kv), ffn {args.intermediate}: {n_params:,} parameters; "
              f"{args.steps} steps x {args.batch} x {args.seq} tokens; {world} process(es) x "
              f"{torch.get_num_threads()} torch thread(s)", flush=True)

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
    # DDP averages the gradients in small buckets while backward is still running: every process
    # ends the step with the whole batch's gradient (each window has `--seq` tokens, so the mean
    # of the processes' mean losses is the batch's), up to the order of float additions.
    forward = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    # Every process reads the whole stream (cheap next to a step) and keeps its share of a batch.
    stream = windows(corpus_documents(args.seed), tokenizer, args.seq)
    share = slice(rank * args.batch // world, (rank + 1) * args.batch // world)

    started = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        ids = torch.tensor(list(itertools.islice(stream, args.batch))[share])
        loss = lm_loss(forward, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # this process's share; the moving average is averaged when logged
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % args.log_every == 0 or step == args.steps:
            logged = global_mean(running, world)
            elapsed = time.perf_counter() - started
            if main_process:
                print(f"step {step}/{args.steps}  loss {logged:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                      f"{step * args.batch * args.seq / elapsed:,.0f} tokens/s  {elapsed:.0f} s elapsed, "
                      f"~{elapsed / step * (args.steps - step):.0f} s left", flush=True)
    train_seconds = time.perf_counter() - started
    if world > 1:
        check_replicas_agree(model)
        # Free DDP's reducer while the process group lives on: the reducer's teardown holds the
        # GIL, and if it released the group's last reference, the group's worker threads (which
        # need the GIL to free tensors) could never be joined.
        del forward
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if not main_process:
        return

    losses = evaluate(model, heldout_batches(tokenizer, args), args.batch)
    unit = "character" if args.tokenizer == "char" else "token"
    print(f"held-out LM loss {losses['all']:.4f} per {unit}; by skill: "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "all"), flush=True)
    skills = skill_accuracy(model, tokenizer, args.seed, args.probes)
    print("held-out skill accuracy (greedy, % exact): " + ", ".join(f"{k} {v:.0f}" for k, v in skills.items()),
          flush=True)

    model.eval()
    model.requires_grad_(False)
    model.config.name_or_path = str(Path(args.out).resolve())
    with _quiet_progress():
        model.save_pretrained(folder)
    info = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "tokens": args.steps * args.batch * args.seq,
        "train_seconds": round(train_seconds, 1),
        "heldout_loss": losses,
        "heldout_loss_unit": unit,
        "skill_accuracy": skills,
        "final_train_loss": logged,
    }
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch.multiprocessing

    from peftrun.models import offline_tokenizer

    out = Path(args.out).resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = offline_tokenizer() if args.tokenizer == "char" else corpus_tokenizer(args.vocab, args.seed)
    try:
        tokenizer.save_pretrained(tmp)
        if args.procs == 1:
            pretrain(0, 1, args, tokenizer, tmp, None)
        else:
            # The processes import this module by name to find `pretrain`, wherever it was loaded from.
            if str(Path(__file__).parent) not in sys.path:
                sys.path.append(str(Path(__file__).parent))
            with tempfile.TemporaryDirectory(prefix="pretrain-rendezvous-") as scratch:
                torch.multiprocessing.spawn(pretrain, nprocs=args.procs, join=True,
                                            args=(args.procs, args, tokenizer, tmp, f"file://{scratch}/store"))
        info = json.loads((tmp / "pretrain.json").read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"saved to {out} ({info['train_seconds']:.0f} s of training)", flush=True)
    return info


if __name__ == "__main__":
    main()
