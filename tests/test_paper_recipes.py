"""The papers' experiments (peftrun/conf/experiment/*_paper.yaml) where they settle a departure
from our defaults: ALoRA decodes with the paper's beam width; IAPT runs in the paper's form (no
gate) with the rational coefficients learning from dev batches, as the authors' group does."""

from __future__ import annotations

from conftest import compose_config


def test_alora_paper_decodes_with_five_beams():
    cfg = compose_config("experiment=alora_paper")
    assert cfg.trainer.num_beams == 5
    assert cfg.method.name == "alora" and cfg.model.name == "llama2_7b"


def test_iapt_paper_has_no_gate_and_alternates_the_rational_coefficients():
    method = compose_config("experiment=iapt_paper").method
    assert (method.name, method.gate, method.gate_lr) == ("iapt", "none", None)
    assert method.rational_update == "alternating" and method.rational_lr == 1e-6
    assert (method.bottleneck, method.n_soft) == (320, 4)
