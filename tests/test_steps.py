"""training_pt/steps.py: the LR schedule, the shared step and the clock that never stops the queue."""

from __future__ import annotations

import pytest
import torch

from training_pt import steps as T


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    t = {"lr": 1e-3, "min_lr": 1e-4, "lr_warmup_steps": 4, "steps": 20}
    assert T.lr_at(0, t) == pytest.approx(2.5e-4)
    assert T.lr_at(3, t) == pytest.approx(1e-3) and T.lr_at(4, t) == pytest.approx(1e-3)
    assert T.lr_at(19, t) == pytest.approx(1e-4)


def tiny_setup(grad_accum: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    t = {
        "grad_accum": grad_accum,
        "grad_clip": 1.0,
        "sdpa_backend": "auto",
        "autocast": "none",
        "compile": False,
        "compile_mode": "default",
        "fused_adamw": True,
        "weight_decay": 0.0,
        "lr": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
    }

    class Fixed:
        batch_size = 2

        def __init__(self):
            self.calls = 0

        def next(self):
            self.calls += 1
            x = torch.ones(self.batch_size, 4)
            return x, torch.zeros(self.batch_size, 1)

    def forward(x, y):
        return torch.nn.functional.mse_loss(model(x), y)

    batches = Fixed()
    stepper = T.Stepper(
        forward, model, T.make_optimizer(model, t, torch.device("cpu")), batches, t, torch.device("cpu")
    )
    return model, batches, stepper, forward


def test_a_step_accumulates_micro_batches_and_returns_the_mean_loss_and_the_norm_before_clipping():
    model, batches, stepper, forward = tiny_setup(grad_accum=3)
    x, y = torch.ones(2, 4), torch.zeros(2, 1)
    expected_loss = forward(x, y).item()
    before = model.weight.detach().clone()
    values = stepper(0.1)
    loss, norm = T.to_host(values).tolist()
    assert batches.calls == 3 and values.shape == (2,)
    # every micro-batch is alike, so their mean is this one loss
    assert loss == pytest.approx(expected_loss, rel=1e-5) and norm > 0
    assert not torch.equal(before, model.weight) and stepper.optimizer.param_groups[0]["lr"] == 0.1
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_the_clock_times_each_step_and_the_window_with_median_and_spread():
    clock = T.StepClock(torch.device("cpu"))
    clock.marks = [0.0, 0.5, 0.6, 0.8, 0.9, 1.4]  # marks at the steps' ends (seconds), as mark() records them
    assert clock.step_ms(0) == pytest.approx(500) and clock.step_ms(2) == pytest.approx(200)
    spread = clock.spread(1, 5)  # steps 1..4: 100, 200, 100, 500 ms
    assert spread["steps"] == 4 and spread["seconds"] == pytest.approx(0.9)
    assert spread["median_ms"] == pytest.approx(150) and spread["min_ms"] == pytest.approx(100)
    assert spread["max_ms"] == pytest.approx(500)
