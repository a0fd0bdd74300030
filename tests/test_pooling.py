"""Pooling over masked positions (PARA, IAPT): only masked positions count, left or right padded."""

from __future__ import annotations

import pytest
import torch

from peftrun.methods.common.pooling import POOLINGS, attention_pool, check_mask, pool

# Row 0 right-padded (prompt at the start, as in training), row 1 left-padded (generation).
MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]])


def hidden(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", POOLINGS)
def test_unmasked_positions_do_not_count(kind):
    h = hidden()
    queries = torch.randn(6, generator=torch.Generator().manual_seed(3))
    other = torch.where(MASK.bool().unsqueeze(-1), h, hidden(seed=1))
    assert not torch.equal(other, h)
    torch.testing.assert_close(pool(other, MASK, kind, queries), pool(h, MASK, kind, queries), rtol=0, atol=0)


def test_reference_values():
    h = hidden()
    torch.testing.assert_close(pool(h, MASK, "last"), torch.stack([h[0, 2], h[1, 3]]))
    torch.testing.assert_close(pool(h, MASK, "mean"), torch.stack([h[0, :3].mean(0), h[1, 2:4].mean(0)]))
    torch.testing.assert_close(pool(h, MASK, "max"), torch.stack([h[0, :3].amax(0), h[1, 2:4].amax(0)]))
    # Zero queries weigh every masked position the same: the mean.
    torch.testing.assert_close(pool(h, MASK, "self_attention", torch.zeros(6)), pool(h, MASK, "mean"))
    q = torch.randn(6)
    weights = torch.softmax(h[1, 2:4] @ q / 6**0.5, dim=0)
    torch.testing.assert_close(pool(h, MASK, "self_attention", q)[1], weights @ h[1, 2:4])


def test_several_queries_give_several_vectors():
    assert attention_pool(hidden(), MASK, torch.randn(6, 4)).shape == (2, 4, 6)


def test_a_row_without_prompt_is_refused():
    with pytest.raises(ValueError, match="no prompt token"):
        check_mask(torch.tensor([[1, 1], [0, 0]]))
