"""The run's AdamW (peftrun/train/optimizer.py): fused where torch's fused kernel takes the
parameters, and the same update as the unfused AdamW either way."""

from __future__ import annotations

import copy

import pytest
import torch

from peftrun.train.optimizer import adamw, fusable


def adapter_like_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Many small tensors with gradients, as an adapter has."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(8, 64), (96, 8), (8, 96), (64, 8), (16,)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g)
        params.append(p)
    return params


def test_fused_on_plain_cpu_parameters_and_not_under_fsdp_or_on_other_tensors():
    params = adapter_like_params()
    assert fusable(params)
    assert adamw(params, lr=1e-3).defaults["fused"]
    assert not fusable(params, sharded=True)
    assert not adamw(params, sharded=True, lr=1e-3).defaults["fused"]
    assert not fusable([torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)])
    assert not fusable([*params, torch.nn.Parameter(torch.zeros(3, device="meta"))])  # one device only


def test_param_groups_keep_their_settings():
    params = adapter_like_params()
    optimizer = adamw([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-3}], lr=5e-3)
    assert optimizer.defaults["fused"]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_steps_equal_torch_adamw_unfused(weight_decay):
    fused, plain = adapter_like_params(), adapter_like_params()
    kwargs = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay)
    fused_opt = adamw(fused, **kwargs)
    plain_opt = torch.optim.AdamW(plain, foreach=False, **kwargs)
    assert fused_opt.defaults["fused"] and not plain_opt.defaults.get("fused")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in fused]
        for a, b, grad in zip(fused, plain, grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        fused_opt.step()
        plain_opt.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max((a - p0).abs().max().item() for a, p0 in zip(fused, adapter_like_params()))
    assert moved > 1e-2  # the steps did move the parameters


def test_a_fused_optimizers_state_round_trips():
    """A resumed run reloads the state a checkpoint saved, and steps on exactly as before."""
    first, second = adapter_like_params(), adapter_like_params()
    opt = adamw(first, lr=1e-2)
    opt.step()
    reloaded = adamw(second, lr=1e-2)
    with torch.no_grad():
        for a, b in zip(first, second):
            b.copy_(a)
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read back from a checkpoint: no shared tensors
    for a, b in zip(first, second):
        b.grad = a.grad.clone()
    opt.step()
    reloaded.step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
