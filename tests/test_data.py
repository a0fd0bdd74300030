"""Tokenization, label masking, truncation and padding, with a character-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from peftrun.data import (IGNORE_INDEX, TokenizeReport, batches, collate_train, encode_prompts,
                          tokenize_examples)
from peftrun.errors import ConfigError
from peftrun.models import offline_tokenizer
from peftrun.tasks.base import Example

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def char_tokenizer(bos: bool = True):
    """The offline character tokenizer (one token per character, `<s>` in front), or without BOS."""
    tok = offline_tokenizer()
    if not bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    return tok


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_char_tokenizer_one_token_per_char(tok):
    special = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    assert special == (PAD, BOS, EOS, UNK)
    assert tok("ab 1=")["input_ids"] == [BOS] + ids(tok, "ab 1=")
    assert len(ids(tok, "max 3815=")) == 9
    assert tok.decode(ids(tok, "max 3815=")) == "max 3815="


def test_toy_rendering_tokenizes_cleanly(tok):
    from peftrun.tasks.toy import render
    ex = render("sort", [3, 8, 1, 5])
    (f,), _ = tokenize_examples([ex], tok, 64)
    assert f["input_ids"] == [BOS] + ids(tok, "sort 3815=") + ids(tok, "1358") + [EOS]
    assert UNK not in f["input_ids"] and len(f["input_ids"]) == 1 + 10 + 4 + 1


def test_labels_masked_on_prompt(tok):
    feats, report = tokenize_examples([Example("ab=", "7")], tok, max_length=32)
    (f,) = feats
    p, t = [BOS] + ids(tok, "ab="), ids(tok, "7") + [EOS]
    assert f["input_ids"] == p + t
    assert f["labels"] == [IGNORE_INDEX] * 4 + t
    assert f["prompt_mask"] == [1, 1, 1, 1, 0, 0]
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 0)


def test_loss_on_prompt_keeps_prompt_labels(tok):
    (f,), _ = tokenize_examples([Example("ab=", "7")], tok, 32, loss_on_prompt=True)
    assert f["labels"] == f["input_ids"]
    assert f["prompt_mask"] == [1, 1, 1, 1, 0, 0]  # still marks the prompt


def test_truncation_cuts_prompt_from_left_keeping_bos(tok):
    # prompt <s>abcdef (7) + target xy</s> (3) = 10 > 6: keep <s> + "ef".
    (f,), report = tokenize_examples([Example("abcdef", "xy")], tok, max_length=6)
    assert f["input_ids"] == [BOS] + ids(tok, "ef") + ids(tok, "xy") + [EOS]
    assert f["labels"] == [IGNORE_INDEX] * 3 + ids(tok, "xy") + [EOS]
    assert f["prompt_mask"] == [1, 1, 1, 0, 0, 0]
    assert (report.kept, report.truncated, report.dropped) == (1, 1, 0)


def test_truncation_without_bos():
    tok = char_tokenizer(bos=False)
    (f,), report = tokenize_examples([Example("abcdef", "xy")], tok, max_length=5)
    assert f["input_ids"] == ids(tok, "ef") + ids(tok, "xy") + [EOS]
    assert report.truncated == 1


def test_exact_fit_is_not_truncated(tok):
    (f,), report = tokenize_examples([Example("abc", "xy")], tok, max_length=7)
    assert len(f["input_ids"]) == 7 and report.truncated == 0


def test_drop_when_target_alone_does_not_fit_and_target_never_cut(tok):
    exs = [Example("abc", "wxyz"),  # <s> + 1 prompt + wxyz</s> = 7 > 6: dropped
           Example("abc", "xyz"),  # <s> c xyz</s> = 6: kept, truncated
           Example("a", "x")]      # fits
    feats, report = tokenize_examples(exs, tok, max_length=6)
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 1)
    assert feats[0]["input_ids"] == [BOS] + ids(tok, "c") + ids(tok, "xyz") + [EOS]
    for f in feats:  # every kept target is whole
        assert len(f["input_ids"]) <= 6
        assert f["input_ids"][-1] == EOS
    assert "dropped" in str(report) and "kept 2 of 3" in str(report)


def test_tokenizer_without_eos_is_a_config_error(tok):
    tok = char_tokenizer()
    tok.eos_token = None
    with pytest.raises(ConfigError) as e:
        tokenize_examples([Example("a", "b")], tok, 8)
    assert e.value.key == "model.tokenizer"


def test_collate_train_right_pads(tok):
    feats, _ = tokenize_examples([Example("ab=", "7"), Example("a=", "12")], tok, 32)
    batch = collate_train(feats, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask"}
    for v in batch.values():
        assert v.shape == (2, 6) and v.dtype == torch.long
    # Rows of unequal length: the shorter one is padded on the right.
    feats2, _ = tokenize_examples([Example("abcd=", "7"), Example("a=", "7")], tok, 32)
    b = collate_train(feats2, pad_token_id=PAD)
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][1].tolist() == [BOS] + ids(tok, "a=7") + [EOS] + [PAD] * 3
    assert b["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 3 + ids(tok, "7") + [EOS] + [-100] * 3
    assert b["prompt_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert b["attention_mask"][0].tolist() == [1] * 8


def test_encode_prompts_left_pads(tok):
    tok.padding_side = "right"  # must not matter
    b = encode_prompts(["ab=", "abcd="], tok, max_length=32)
    assert b["input_ids"].shape == (2, 6)
    assert b["input_ids"][0].tolist() == [PAD, PAD, BOS] + ids(tok, "ab=")
    assert b["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert b["attention_mask"][1].tolist() == [1] * 6
    assert torch.equal(b["prompt_mask"], b["attention_mask"])
    assert tok.padding_side == "right"


def test_encode_prompts_truncates_left_keeping_bos(tok):
    b = encode_prompts(["abcdef", "xy"], tok, max_length=4)
    assert b["input_ids"][0].tolist() == [BOS] + ids(tok, "def")
    assert b["input_ids"][1].tolist() == [PAD, BOS] + ids(tok, "xy")


def test_encode_prompts_pad_falls_back_to_eos():
    tok = char_tokenizer()
    tok.pad_token = None
    b = encode_prompts(["a", "abc"], tok, 8)
    assert b["input_ids"][0].tolist() == [EOS, EOS, BOS] + ids(tok, "a")


def test_batches():
    assert list(batches(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batches([], 3)) == []
    with pytest.raises(ValueError):
        list(batches([1], 0))


def test_report_str():
    assert str(TokenizeReport(3, 1, 2)).startswith("kept 3 of 5 examples")
