"""Every method on a 4-bit (NF4) and an 8-bit backbone (bitsandbytes runs both on x86-64 CPUs):
it attaches, only its own tensors train, one step lowers the loss, and the frozen quantized
weights do not move. Merging into quantized weights is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import compose_config, toy_batch  # noqa: E402
from peftrun.methods import build_method  # noqa: E402
from peftrun.models import build_model, load_tokenizer  # noqa: E402
from peftrun.loss import token_loss_sum  # noqa: E402

# overrides, learning rate (PARA and IAPT only rescale or add positions: they need a larger one)
METHODS = {
    "lora": (("method=lora", "method.r=4"), 1e-2),
    "tied_lora": (("method=tied_lora", "method.r=4"), 1e-2),
    "alora": (("method=alora", "method.r_init=2", "method.max_rank=4"), 1e-2),
    "para": (("method=para",), 3e-2),
    "iapt": (("method=iapt", "method.bottleneck=8"), 3e-2),
}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_a_quantized_backbone(method, quantization):
    overrides, lr = METHODS[method]
    cfg = compose_config(*overrides, f"model.quantization={quantization}")
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert quantized, "the backbone is quantized"
    frozen_before = [m.weight.detach().clone() for m in quantized]
    torch.manual_seed(0)
    adapter = build_method(cfg.method).attach(model)
    params = [p for _, p in adapter.trainable_parameters()]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    batch = toy_batch(tokenizer, n=16)
    optimizer = torch.optim.AdamW(params, lr=lr)

    def loss() -> torch.Tensor:
        adapter.set_prompt_mask(batch["prompt_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sum(logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()

    model.eval()
    losses = []
    for _ in range(3):
        value = loss()
        losses.append(float(value.detach()))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        losses.append(float(loss()))
    assert losses[-1] < losses[0]
    for module, before in zip(quantized, frozen_before):
        assert torch.equal(module.weight.detach(), before)
    if adapter.supports_merge:
        with pytest.raises(RuntimeError, match="unquantized"):
            adapter.merge()
