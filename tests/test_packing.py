"""trainer.packing and trainer.group_by_length: the packed collator's layout, every method's loss
and gradients on a packed micro-batch equal to the padded one's, which backbones keep packed
examples apart (peftrun/packing.py's table, checked on every family of test_architectures.py),
the length-grouped data order, the refusals, and a packed run through the command line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_close_in_fp32, compose_config, run_cli
from peftrun.data import IGNORE_INDEX, collate_packed, collate_train, pack_rows, real_tokens
from peftrun.loss import label_tokens, labelled_loss_sum, model_inputs
from peftrun.methods import build_method
from peftrun.packing import EXPLICIT_MASK, REFUSED, TESTED
from peftrun.train.schedule import GROUP_WINDOW, DataOrder
from test_architectures import FAMILIES_AND_VARIANTS, METHODS, VOCAB, build, method_config, perturb


def feature(ids: list[int], prompt: int, loss_on_prompt: bool = False) -> dict:
    return {"input_ids": list(ids), "prompt_mask": [1] * prompt + [0] * (len(ids) - prompt),
            "labels": list(ids) if loss_on_prompt else [IGNORE_INDEX] * prompt + list(ids[prompt:])}


def random_features(lengths, seed: int = 0) -> list[dict]:
    """Examples of these lengths, random ids, a prompt of about half (at least one token)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(feature(ids, max(1, n // 2), loss_on_prompt=i == 1))
    return out


# ------------------------------------------------------------------------------- the collator
def test_first_fit_decreasing_rows():
    assert pack_rows([3, 8, 5, 2, 6], 10) == [[1, 3], [4, 0], [2]]
    assert pack_rows([10, 1], 10) == [[0], [1]]  # an example exactly the capacity fills a row
    assert pack_rows([12], 10) == [[0]]  # longer than the capacity: a row of its own
    assert pack_rows([], 10) == []


def test_packed_layout_boundaries_positions_labels_and_segments():
    a, b, c = feature([1, 10, 11, 12], 2), feature([1, 20, 21], 1, loss_on_prompt=True), feature([1, 30, 31, 32, 33], 3)
    batch = collate_packed([a, b, c], pad_token_id=0, max_length=8)
    # Longest first: c (5) opens row 0, a (4) does not fit beside it and opens row 1, b (3) joins c.
    assert batch["input_ids"].tolist() == [[1, 30, 31, 32, 33, 1, 20, 21], [1, 10, 11, 12, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    # b is labelled on its prompt too, but its first token is never a label: c's last token does
    # not predict across the boundary. Padding has no labels.
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, 32, 33, x, 20, 21], [x, x, 11, 12, x, x, x, x]]
    assert set(batch) == {"input_ids", "labels", "prompt_mask", "position_ids", "segment_ids"}
    padded = collate_train([a, b, c], pad_token_id=0)
    assert label_tokens(batch) == label_tokens(padded) == 6
    assert real_tokens(batch) == real_tokens(padded) == 12


def test_an_example_exactly_max_length_long_fills_its_row():
    full, short = feature(list(range(3, 11)), 4), feature([1, 5, 6], 1)
    batch = collate_packed([short, full], pad_token_id=0, max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["segment_ids"].tolist() == [[0] * 8, [1, 1, 1, -1, -1, -1, -1, -1]]
    assert batch["position_ids"][0].tolist() == list(range(8))
    # Rows are trimmed to the longest packed row, not padded to max_length.
    assert collate_packed([short, short], pad_token_id=0, max_length=64)["input_ids"].shape == (1, 6)


# --------------------------------------------------------------- which backbones keep examples apart
ALL_FAMILIES = list(FAMILIES_AND_VARIANTS)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_packed_row_is_its_examples_run_alone(family):
    """The logits of a packed batch (through loss.model_inputs: positions, and the explicit mask
    where packing.py asks for one) equal those of each example alone, for every family packing.py
    accepts; a refused family really mixes its examples."""
    model = build(family)
    model_type = model.config.model_type
    assert model_type in TESTED or model_type in REFUSED, f"add {model_type} to packing.py's tables"
    features = random_features([5, 7, 3, 6])
    batch = collate_packed(features, pad_token_id=0, max_length=12)
    assert batch["input_ids"].shape[0] < len(features)  # some rows hold several examples
    with torch.no_grad():
        packed = model(**model_inputs(model, batch)).logits
        alone = [model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0] for f in features]
    segments = batch["segment_ids"]
    # Examples are numbered in the packed order; match them to the features by their ids.
    worst = 0.0
    for k in range(int(segments.max()) + 1):
        where = segments == k
        ids = batch["input_ids"][where].tolist()
        i = next(i for i, f in enumerate(features) if f["input_ids"] == ids)
        worst = max(worst, float((packed[where] - alone[i]).abs().max()))
    if model_type in REFUSED:
        assert worst > 1e-4, f"{family} keeps packed examples apart: take it off packing.py's REFUSED"
    else:
        assert worst < 1e-5, f"{family}: a packed example's logits differ from its own by {worst:.2e}"


def test_the_explicit_mask_families_are_tested():
    assert EXPLICIT_MASK <= TESTED and not set(REFUSED) & TESTED


# --------------------------------------------------------------------- every method, packed == padded
EQUIVALENCE_FAMILIES = ("llama", "gpt2", "opt")
CELLS = [(f, m) for f in EQUIVALENCE_FAMILIES for m in METHODS]


def loss_and_grads(model, adapter, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = dict(adapter.trainable_parameters())
    for p in params.values():
        p.grad = None
    if "segment_ids" in batch:
        adapter.set_prompt_mask(batch["prompt_mask"], batch["segment_ids"])
    else:
        adapter.set_prompt_mask(batch["prompt_mask"])
    loss = labelled_loss_sum(model, batch)
    loss.backward()
    adapter.set_prompt_mask(None)
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize(("family", "method"), CELLS, ids=[f"{f}-{m}" for f, m in CELLS])
def test_packed_loss_and_gradients_equal_the_padded_batch(family, method):
    """One micro-batch's summed loss and every adapter gradient are those of the padded batch
    (within fp32 rounding), the adapter perturbed first so no gradient is trivially zero."""
    model = build(family)
    torch.manual_seed(0)
    adapter = build_method(method_config(method, family)).attach(model)
    perturb(adapter)
    features = random_features([9, 4, 12, 7, 5, 3, 16, 2])
    padded = collate_train(features, pad_token_id=0)
    packed = collate_packed(features, pad_token_id=0, max_length=16)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss, grads = loss_and_grads(model, adapter, padded)
    packed_loss, packed_grads = loss_and_grads(model, adapter, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == packed_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name}: a zero gradient proves nothing"
        assert_close_in_fp32(packed_grads[name], grad, msg=name)


def test_para_pools_each_packed_example_over_its_own_prompt():
    """PARA's vectors of a packed batch, one per example, are those of each example alone."""
    model = build("llama")
    adapter = build_method(method_config("para", "llama")).attach(model)
    perturb(adapter)
    features = random_features([6, 4, 5])
    batch = collate_packed(features, pad_token_id=0, max_length=16)
    adapter.set_prompt_mask(batch["prompt_mask"], batch["segment_ids"])
    with torch.no_grad():
        model(**model_inputs(model, batch))
    packed = {layer: v.clone() for layer, v in adapter.vectors().items()}
    order = [features.index(next(f for f in features if f["input_ids"] == batch["input_ids"][batch["segment_ids"] == k]
                                 .tolist())) for k in range(len(features))]
    for k, i in enumerate(order):
        one = collate_train([features[i]], pad_token_id=0)
        adapter.set_prompt_mask(one["prompt_mask"])
        with torch.no_grad():
            model(**model_inputs(model, one))
        for layer, vectors in adapter.vectors().items():
            torch.testing.assert_close(packed[layer][k], vectors[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- the length-grouped order
def test_group_by_length_is_a_seeded_permutation_of_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 512, (1000,), generator=g).tolist()
    order = DataOrder(1000, 16, seed=3, lengths=lengths)
    again = DataOrder(1000, 16, seed=3, lengths=lengths)
    epoch = [order.step_indices(s) for s in range(order.steps_per_epoch)]
    assert order.steps_per_epoch == 62
    flat = [i for batch in epoch for i in batch]
    assert len(set(flat)) == len(flat) == 62 * 16  # each example at most once an epoch
    # A pure function of the step: another instance, steps asked in another order, agrees.
    assert [again.step_indices(s) for s in reversed(range(62))] == epoch[::-1]
    assert order.step_indices(62) == again.step_indices(62) != epoch[0]  # epoch 2 reshuffles
    assert DataOrder(1000, 16, seed=4, lengths=lengths).step_indices(0) != epoch[0]
    # Each batch sorted longest first, and far narrower in length than a random batch.
    for batch in epoch:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    spread = sum(lengths[b[0]] - lengths[b[-1]] for b in epoch) / len(epoch)
    plain = DataOrder(1000, 16, seed=3)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                        for b in map(plain.step_indices, range(62))) / 62
    assert spread < random_spread / 5
    # The batches are shuffled, not served shortest to longest across a window.
    firsts = [lengths[b[0]] for b in epoch[:GROUP_WINDOW]]
    assert firsts != sorted(firsts, reverse=True)


def test_group_by_length_needs_one_length_per_example():
    with pytest.raises(ValueError, match="3 lengths for 4 examples"):
        DataOrder(4, 2, seed=0, lengths=[1, 2, 3])


# ------------------------------------------------------------------------------------ the refusals
def bloom_folder(path):
    """A local Bloom checkpoint's config and tokenizer (no weights: validation never loads any)."""
    from transformers import BloomConfig

    from peftrun.models import offline_tokenizer

    tokenizer = offline_tokenizer()
    tokenizer.save_pretrained(path)
    BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [[], ["trainer.packing=false"]], ids=["packing", "no-packing"])
def test_packing_on_a_backbone_that_mixes_examples_is_refused(tmp_path, monkeypatch, extra):
    from test_bad_input import refusal

    folder = bloom_folder(tmp_path / "bloom")
    argv = ["model=gpt2", f"model.name_or_path={folder}", "trainer.packing=true", *extra,
            f"hydra.run.dir={tmp_path / 'run'}"]
    err = refusal(argv, monkeypatch)
    if extra:
        assert err is None
        return
    assert err is not None and err.key == "trainer.packing"
    assert "Bloom" in err.message and "trainer.packing=false" in err.message and "\n" not in str(err)


def test_packing_refusals_name_the_fix():
    from peftrun.packing import packing_refusal

    assert packing_refusal("llama", "flash_attention_2") is None  # varlen flash attention reads the positions
    assert "not checked" in packing_refusal("mpt", "sdpa")
    assert "flash_attention_2" in packing_refusal("opt", "flash_attention_2")
    assert packing_refusal("opt", None) is None and packing_refusal("gpt_oss", "eager") is None


# ---------------------------------------------------------------------------- a packed run, end to end
@pytest.mark.slow
def test_a_packed_run_through_the_command_line_resumes(tmp_path):
    """trainer.packing=true with trainer.group_by_length=true and PARA (prompt-aware): the run
    trains, and a run stopped after its step-4 checkpoint and started again ends with the same
    adapter as one never stopped."""
    from safetensors.torch import load_file

    from peftrun.train.loop import train

    overrides = ["method=para", "method.bottleneck=4", "trainer.packing=true", "trainer.group_by_length=true",
                 "trainer.max_steps=8", "trainer.save_every=4", "trainer.eval_every=4", "trainer.micro_batch_size=8",
                 "trainer.grad_accum=2", "trainer.progress=false", "task.num_train=64", "task.num_dev=16",
                 "task.num_test=8"]
    whole = tmp_path / "whole"
    result = run_cli(*overrides, f"hydra.run.dir={whole}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train_loss"] < 10  # finite

    class Stop:
        def on_step_end(self, state):
            if state.step == 5:
                raise KeyboardInterrupt

    stopped = tmp_path / "stopped"
    cfg = compose_config(*overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stopped, extra_callbacks=[Stop()])
    train(cfg, stopped)
    expected = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_packing_defaults_off():
    t = compose_config().trainer
    assert t.packing is False and t.group_by_length is False


@pytest.mark.slow
def test_a_packed_run_trains_as_the_padded_run(tmp_path):
    """Through the loop (micro-batches, the adapter told each packed example, dev loss packed too):
    the same losses as without packing, within float rounding."""
    from peftrun.train.loop import train

    common = ["method=para", "method.bottleneck=4", "trainer.max_steps=3", "trainer.eval_every=0",
              "trainer.save_every=0", "trainer.micro_batch_size=8", "trainer.grad_accum=2",
              "trainer.progress=false", "task.num_train=64", "task.num_dev=24", "task.num_test=4"]
    padded = train(compose_config(*common), tmp_path / "padded")
    packed = train(compose_config(*common, "trainer.packing=true"), tmp_path / "packed")
    for key in ("train_loss", "dev_loss"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4), key
