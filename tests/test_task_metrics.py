"""The papers' metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from peftrun.tasks.metrics import (choice_accuracy, corpus_bleu, final_number, number_match,
                                   rouge_l, squad_f1, squad_scores)


def test_squad_f1_bag_of_normalized_tokens():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("cat", ["dog", "Cat!"]) == 1.0  # best reference
    assert squad_f1("dog", ["cat"]) == 0.0
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clipped


def test_squad_scores_em_f1_and_their_mean():
    scores = squad_scores(["Paris", "the big apple"], [["paris"], ["big apple pie"]])
    # EM: 1, 0 -> 50; F1: 1, 0.8 -> 90; mean 70
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 90.0, "em_f1": 70.0})


@pytest.mark.parametrize("text,number", [
    ("He has 3 + 2 = 5 apples.\n#### 5", 5.0),
    ("#### 1,234", 1234.0),
    ("so the answer is 3.5.", 3.5),
    ("-5 then 7", 7.0),
    ("it costs -4", -4.0),
    ("no number here", None),
    ("first 12 then #### 72 and 9", 72.0),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_gsm8k_number_match():
    ref = ["2 + 16 = <<2+16=18>>18\n#### 18"]
    assert number_match("The answer is 18.", ref) == 1.0
    assert number_match("Step: 2 + 16 = 18 #### 18", ref) == 1.0
    assert number_match("18 then 19", ref) == 0.0
    assert number_match("18.0", ref) == 1.0
    assert number_match("none", ref) == 0.0


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P 1, R 1/2, F 2/3
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(200 / 3)
    # the best reference counts; the mean is over examples
    assert rouge_l(["a b", "x"], [["zzz", "a b"], ["y"]]) == pytest.approx(50.0)
    assert rouge_l([], []) == 0.0


def test_corpus_bleu_hand_computed():
    # pred "the cat sat on the mat" vs "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3; equal lengths (no brevity penalty)
    expected = 100 * math.exp(sum(map(math.log, (5 / 6, 3 / 5, 2 / 4, 1 / 3))) / 4)
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, abs=1e-6)
    assert corpus_bleu(["a b c d"], [["x y z w", "a b c d"]]) == pytest.approx(100.0)
    # different numbers of references per example
    assert corpus_bleu(["a b c d", "e f g h"], [["a b c d"], ["q", "e f g h"]]) == pytest.approx(100.0)


def test_choice_accuracy_normalizes_label_text():
    assert choice_accuracy(["Yes.", " no", " B", "b)"], [["yes"], ["yes"], ["B"], ["B"]]) == 75.0
    # the letter A is not an article to drop: an empty generation does not match it
    assert choice_accuracy(["", " A", "an"], [["A"], ["A"], ["A"]]) == pytest.approx(100 / 3)
