"""The reference training loop: learning, checkpoints, resume, NaN guard, hooks, distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorslim.train.loop as loop
from tensorslim.data import load_dataset, make_loaders
from tensorslim.errors import TensorslimError
from tensorslim.train.checkpoint import load_checkpoint
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    evaluate,
    fit,
)
from tensorslim.train.losses import distillation_loss


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # dropout makes the run depend on the global RNG, which resume must restore too
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4)
    )


def loader(seed: int = 0, n: int = 64, batch: int = 16) -> DataLoader:
    """A fresh shuffling loader, as a new process would build it from the same seed."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :4].argmax(dim=1)).long()  # learnable: the largest of 4 pixels
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


class Counting(TrainHook):
    """Counts every call and checks what the loop promises at each point."""

    def __init__(self) -> None:
        self.calls = {"begin": 0, "extra": 0, "backward": 0, "step": 0, "epoch": 0}
        self.total_steps = -1
        self.steps: list[int] = []
        self.restored: dict | None = None

    def on_train_begin(self, model, optimizer, total_steps) -> None:
        self.calls["begin"] += 1
        self.total_steps = total_steps

    def extra_loss(self, model, step):
        self.calls["extra"] += 1
        self.steps.append(step)
        return 1e-4 * sum(p.pow(2).sum() for p in model.parameters())

    def after_backward(self, model, optimizer, step) -> None:
        self.calls["backward"] += 1
        assert all(p.grad is not None for p in model.parameters())

    def after_step(self, model, optimizer, step) -> None:
        self.calls["step"] += 1

    def on_epoch_end(self, model, epoch):
        self.calls["epoch"] += 1
        return {"hook_steps": float(self.calls["step"])}

    def state_dict(self):
        return {"steps": self.calls["step"]}

    def load_state_dict(self, state) -> None:
        self.restored = dict(state)


class Interrupt(TrainHook):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def after_step(self, model, optimizer, step) -> None:
        if step == self.at_step:
            raise KeyboardInterrupt


def test_loss_decreases_on_synthetic_data() -> None:
    bundle = load_dataset("synthetic", seed=0, limit_train=256, limit_test=128)
    train, test = make_loaders(bundle, 32, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    before = evaluate(model, test)
    history = fit(model, train, epochs=3, lr=0.05, test_loader=test, progress=False)
    losses = [e["train_loss"] for e in history.epochs]
    assert losses[-1] < losses[0]
    after = history.last()
    assert after["test_loss"] < before["loss"]
    assert after["test_accuracy"] > max(0.5, before["accuracy"])
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    assert history.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12), "cosine ends at 0"


def test_a_checkpoint_is_written_atomically_after_each_epoch(tmp_path, monkeypatch) -> None:
    written = []
    real = loop.save_checkpoint

    def spy(path, state):
        written.append((path, state["epoch"], len(state["history"])))
        real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    fit(mlp(), loader(), epochs=3, lr=0.05, checkpoint_dir=tmp_path, progress=False)
    assert written == [(tmp_path / CHECKPOINT_NAME, e, e) for e in (1, 2, 3)]
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME], "no temporary files left"
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 3 and len(state["history"]) == 3


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path) -> None:
    straight = mlp(seed=0)
    full = fit(straight, loader(), epochs=3, lr=0.05, checkpoint_dir=tmp_path / "a", progress=False)

    broken = mlp(seed=0)
    steps_per_epoch = len(loader())
    with pytest.raises(KeyboardInterrupt):
        fit(
            broken,
            loader(),
            epochs=3,
            lr=0.05,
            hooks=[Interrupt(at_step=steps_per_epoch + 1)],  # inside the second epoch
            checkpoint_dir=tmp_path / "b",
            progress=False,
        )
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["epoch"] == 1

    resumed_model = mlp(seed=99)  # other weights: the checkpoint must replace them
    messages: list[str] = []
    resumed = fit(
        resumed_model,
        loader(),
        epochs=3,
        lr=0.05,
        checkpoint_dir=tmp_path / "b",
        resume=True,
        progress=False,
        log=messages.append,
    )
    assert messages[0].startswith("resumed from") and "after epoch 1" in messages[0]
    assert [e["epoch"] for e in resumed.epochs] == [1, 2, 3]
    for got, want in zip(resumed.epochs, full.epochs, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
    for (name, a), b in zip(
        resumed_model.state_dict().items(), straight.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_of_a_finished_run_does_nothing_more(tmp_path) -> None:
    model = mlp()
    fit(model, loader(), epochs=2, lr=0.05, checkpoint_dir=tmp_path, progress=False)
    again = mlp(seed=5)
    history = fit(again, loader(), epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(history.epochs) == 2
    for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_hooks_are_called_and_their_state_is_checkpointed(tmp_path) -> None:
    hook = Counting()
    data = loader()
    steps = len(data)
    history = fit(
        mlp(), data, epochs=2, lr=0.05, hooks=[hook], checkpoint_dir=tmp_path, progress=False
    )
    assert hook.calls == {
        "begin": 1,
        "extra": 2 * steps,
        "backward": 2 * steps,
        "step": 2 * steps,
        "epoch": 2,
    }
    assert hook.total_steps == 2 * steps
    assert hook.steps == list(range(2 * steps))
    assert [e["hook_steps"] for e in history.epochs] == [steps, 2 * steps]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["hooks"] == [{"steps": 2 * steps}]
    again = Counting()
    fit(
        mlp(),
        data,
        epochs=3,
        lr=0.05,
        hooks=[again],
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert again.restored == {"steps": 2 * steps}
    assert again.calls["step"] == steps, "only the third epoch runs"
    assert again.steps == list(range(2 * steps, 3 * steps))


def test_max_steps_per_epoch_caps_the_epoch() -> None:
    hook = Counting()
    fit(mlp(), loader(), epochs=2, max_steps_per_epoch=2, hooks=[hook], progress=False)
    assert hook.calls["step"] == 4 and hook.total_steps == 4


def test_non_finite_loss_stops_with_the_checkpoint_kept(tmp_path) -> None:
    class Poison(TrainHook):
        def extra_loss(self, model, step):
            return torch.tensor(float("nan")) if step >= len(loader()) + 1 else None

    model = mlp()
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 2") as info:
        fit(
            model,
            loader(),
            epochs=3,
            lr=0.05,
            hooks=[Poison()],
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert str(tmp_path / CHECKPOINT_NAME) in str(info.value)
    assert isinstance(info.value, TensorslimError)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no NaN step was taken"


def test_distillation_runs_and_its_loss_is_hintons() -> None:
    teacher = mlp(seed=1).eval()
    student = mlp(seed=2)
    history = fit(
        student,
        loader(),
        epochs=1,
        lr=0.05,
        teacher=teacher,
        kd_alpha=0.7,
        optimizer="adam",
        progress=False,
    )
    assert math.isfinite(history.last()["train_loss"])
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    temperature = 3.0
    p_t = F.softmax(t / temperature, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temperature, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(distillation_loss(s, t, temperature), kl * temperature**2)
    assert float(distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_accuracy_and_loss() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * torch.tensor([[2.0, 0.0, 0.0]]).expand(x.shape[0], 3)

    targets = torch.tensor([0, 0, 1, 2])
    data = DataLoader(TensorDataset(torch.zeros(4, 1), targets), batch_size=3)
    metrics = evaluate(Fixed(), data)
    assert metrics["accuracy"] == 0.5
    logits = torch.tensor([[2.0, 0.0, 0.0]]).expand(4, 3)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, targets)))
    with pytest.raises(TensorslimError, match="empty"):
        evaluate(Fixed(), [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": -1}, "epochs"),
        ({"epochs": 1, "lr": 0.0}, "learning rate"),
        ({"epochs": 1, "schedule": "linear"}, "schedule"),
        ({"epochs": 1, "optimizer": "lion"}, "optimizer"),
    ],
)
def test_bad_training_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(TensorslimError, match=message):
        fit(mlp(), loader(), progress=False, **kwargs)


def test_an_empty_or_unsized_loader_is_a_clear_error() -> None:
    with pytest.raises(TensorslimError, match="empty"):
        fit(mlp(), [], epochs=1, progress=False)
    with pytest.raises(TensorslimError, match="max_steps_per_epoch"):
        fit(mlp(), (batch for batch in loader()), epochs=1, progress=False)


def test_fit_trains_a_model_the_caller_already_wrapped_in_ddp(tmp_path) -> None:
    """A DDP-wrapped model is trained through that wrapper, not wrapped a second time."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = mlp()
        wrapped = DistributedDataParallel(model)
        seen: list[nn.Module] = []

        class Record(TrainHook):
            def on_train_begin(self, net, optimizer, total_steps) -> None:  # type: ignore[override]
                seen.append(net)

        before = model[1].weight.detach().clone()
        fit(wrapped, loader(), epochs=1, lr=0.1, hooks=[Record()], progress=False)
        assert seen == [wrapped]  # the caller's wrapper, not a DDP around a DDP
        assert not torch.equal(model[1].weight, before)  # the inner module learned
    finally:
        dist.destroy_process_group()
