"""Distillation on unlabeled batches: the compressed model moves toward the original, and an
interrupted run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.errors import TensorslimError
from tensorslim.train.losses import (
    hidden_state_distillation,
    layer_distillation,
    pooled_embedding_distillation,
)

transformers = pytest.importorskip(
    "transformers", reason="transformers (the .[hf] extra) is absent"
)


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def unlabeled(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (8, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def hidden_error(student, teacher, batches, pooled: bool) -> float:
    """‖h_s − h_t‖ / ‖h_t‖ over the real tokens of ``batches`` (or their mean-pooled sums)."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].bool()
            s, t = student(**b).last_hidden_state[m], teacher(**b).last_hidden_state[m]
            if pooled:
                s, t = s.sum(0), t.sum(0)
            num, den = num + float((s - t).pow(2).sum()), den + float(t.pow(2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("loss", ["hidden", "layers", "pooled", "relational", "layers+relational"])
def test_distillation_moves_the_student_toward_the_teacher(loss: str) -> None:
    teacher = tiny_bert()
    data = unlabeled(6)
    plan = ts.plan(teacher, "svd_llm", "params=0.6", calibration=data)
    student = ts.apply(teacher, plan)
    held_out = unlabeled(2, seed=7)
    before = hidden_error(student, teacher, held_out, False)
    history = ts.distill(student, teacher, data, epochs=4, loss=loss, lr=1e-4, progress=False)
    assert len(history.epochs) == 4 and "train_distill_loss" in history.epochs[-1]
    assert history.epochs[-1]["train_distill_loss"] < history.epochs[0]["train_distill_loss"]
    if loss in ("hidden", "layers", "layers+relational"):
        # a random tiny BERT: only the token-level signal generalises reliably
        assert hidden_error(student, teacher, held_out, False) < before


def test_layer_loss_is_the_mean_of_each_layers_hidden_state_loss() -> None:
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 4, generator=g) for _ in range(4)]  # embeddings + 3 layers
    teacher = [torch.randn(2, 5, 4, generator=g) for _ in range(4)]
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    got = layer_distillation(0.5)(
        {"hidden_states": tuple(student)}, {"hidden_states": tuple(teacher)}, batch
    )
    per_layer = hidden_state_distillation(0.5)
    want = sum(per_layer(s, t, batch) for s, t in zip(student[1:], teacher[1:], strict=True)) / 3
    torch.testing.assert_close(got, want)
    same = {"hidden_states": tuple(teacher)}
    assert float(layer_distillation()(same, same, batch)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(TensorslimError, match="output_hidden_states"):
        layer_distillation()(student[0], teacher[0], batch)


def test_interrupted_distillation_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    import tensorslim.train.loop as loop

    teacher = tiny_bert()
    data = unlabeled(3)
    plan = ts.plan(teacher, "svd", "params=0.7", data[0])
    straight = ts.apply(teacher, plan)
    ts.distill(straight, teacher, data, epochs=2, lr=1e-3, progress=False)

    save = loop._save

    def save_then_die(run, epoch):  # the process is killed right after the first checkpoint
        save(run, epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ts.distill(ts.apply(teacher, plan), teacher, data, epochs=2, lr=1e-3, progress=False,
                   checkpoint_dir=tmp_path)  # fmt: skip
    monkeypatch.setattr(loop, "_save", save)
    again = ts.apply(teacher, plan)  # a fresh process rebuilds the model, then resumes
    history = ts.distill(
        again,
        teacher,
        data,
        epochs=2,
        lr=1e-3,
        progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(history.epochs) == 2
    for a, b in zip(straight.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_masked_losses_ignore_padding() -> None:
    hidden = torch.randn(2, 4, 8)
    other = hidden.clone()
    other[:, 3] += 100.0  # differs only at a padded position
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    out = transformers.modeling_outputs.BaseModelOutput
    batch = {"attention_mask": mask}
    for loss in (hidden_state_distillation(), pooled_embedding_distillation()):
        value = loss(out(last_hidden_state=hidden), out(last_hidden_state=other), batch)
        assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_only_structured_trains_the_factors_alone() -> None:
    teacher = tiny_bert()
    data = unlabeled(2)
    student = ts.apply(teacher, ts.plan(teacher, "svd", "params=0.7", data[0]))
    frozen_before = {
        n: p.detach().clone() for n, p in student.named_parameters() if "embeddings" in n
    }
    factor = next(p for n, p in student.named_parameters() if n.endswith("down.weight"))
    start = factor.detach().clone()
    ts.distill(student, teacher, data, epochs=1, lr=1e-3, progress=False, only_structured=True)
    for name, value in frozen_before.items():
        torch.testing.assert_close(dict(student.named_parameters())[name], value, rtol=0, atol=0)
    assert not torch.equal(factor.detach(), start)
    assert all(p.requires_grad for p in student.parameters())  # restored afterwards


def test_warmup_ramps_the_learning_rate_before_the_cosine(monkeypatch) -> None:
    import tensorslim.train.loop as loop

    seen = []
    real = loop.lr_schedule

    def spy(schedule, warmup_steps, total_steps):
        seen.append((schedule, warmup_steps, total_steps))
        return real(schedule, warmup_steps, total_steps)

    monkeypatch.setattr(loop, "lr_schedule", spy)
    teacher = tiny_bert()
    data = unlabeled(4)
    student = ts.apply(teacher, ts.plan(teacher, "svd", "params=0.7", data[0]))
    from tensorslim.train.hooks import TrainHook

    class Held(TrainHook):  # a per-epoch held-out score, as the benchmark records it
        def on_epoch_end(self, model, epoch):
            return {"held_out": hidden_error(model, teacher, data[:1], False)}

    history = ts.distill(
        student, teacher, data, epochs=2, lr=1e-3, warmup=0.5, progress=False, hooks=[Held()]
    )
    assert [("held_out" in e) for e in history.epochs] == [True, True]
    assert seen == [("cosine", 2, 8)]  # half an epoch of 4 batches, of 2 epochs
    factor = real("cosine", 2, 8)
    assert [factor(0), factor(1), factor(2)] == [0.5, 1.0, 1.0]  # linear ramp, then the cosine
    assert factor(5) < factor(2)
    with pytest.raises(TensorslimError, match="warmup"):
        ts.distill(student, teacher, data, epochs=1, warmup=2.0, progress=False)


def test_sampled_gaussian_loss_squared_gradients_estimate_the_fisher() -> None:
    from tensorslim.train.losses import sampled_gaussian_loss

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    x = torch.tensor([[1.0, -2.0, 0.5]])
    loss = sampled_gaussian_loss(seed=1)
    total = torch.zeros_like(layer.weight)
    draws = 4000
    for _ in range(draws):
        layer.zero_grad()
        loss(layer(x), x).backward()
        total += layer.weight.grad.pow(2)
    # f = W x, so the Fisher diagonal of W_ij is x_j² for every output row i
    torch.testing.assert_close(total / draws, x.pow(2).expand(2, 3), rtol=0.1, atol=0.0)
