"""tensorslim.inputs: every input structure is called, moved, sliced and counted one way."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.inputs import (
    Inputs,
    as_inputs,
    batch_inputs,
    batch_size,
    batch_targets,
    call_model,
    call_on_batch,
    describe,
    output_tensor,
    take_samples,
    to_device,
    zeros_from,
)


class TwoArgs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return (a + 2 * b) * scale


def test_example_inputs_of_every_structure_call_the_model() -> None:
    a, b = torch.ones(3, 2), torch.full((3, 2), 5.0)
    model = TwoArgs()
    want = a + 2 * b
    for example in ((a, b), [a, b], {"a": a, "b": b}, Inputs((a,), {"b": b})):
        torch.testing.assert_close(call_model(model, example), want)
    assert as_inputs(a).args == (a,)
    with pytest.raises(TensorslimError, match="forward_fn"):
        as_inputs(42)
    assert call_model(model, "anything", forward_fn=lambda m, x: x) == "anything"


def test_loader_batches_separate_inputs_from_targets() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert batch_inputs((x, y)).args == (x,)
    assert batch_targets([x, y]) is y
    encoded = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "labels": y}
    assert set(batch_inputs(encoded).kwargs) == {"input_ids", "labels"}
    assert batch_targets(encoded) is y
    with pytest.raises(TensorslimError, match="no targets"):
        batch_targets(x)
    model = TwoArgs()
    torch.testing.assert_close(call_on_batch(model, ((x, x), y)), 3 * x)


def test_slicing_moving_and_counting_reach_every_tensor() -> None:
    batch = {
        "ids": torch.arange(12).reshape(4, 3),
        "extra": (torch.ones(4, 2), 7),
        "t": torch.tensor(2.0),
    }
    one = take_samples(batch, 1)
    assert one["ids"].shape == (1, 3) and one["extra"][0].shape == (1, 2) and one["extra"][1] == 7
    assert one["t"].dim() == 0, "a 0-d tensor has no batch dimension to slice"
    assert batch_size(batch) == 4
    moved = to_device(batch, "meta")
    assert moved["ids"].device.type == "meta" and moved["extra"][0].device.type == "meta"
    with pytest.raises(TensorslimError, match="batch size"):
        batch_size({"t": torch.tensor(1.0)})


def test_describe_and_zeros_round_trip_structure_shapes_and_dtypes() -> None:
    example = Inputs((torch.ones(2, 3),), {"mask": torch.ones(2, 3, dtype=torch.long), "n": 4})
    spec = describe(example)
    rebuilt = zeros_from(spec)
    assert isinstance(rebuilt, Inputs)
    assert rebuilt.args[0].shape == (2, 3) and rebuilt.args[0].dtype == torch.float32
    assert rebuilt.kwargs["mask"].dtype == torch.long and rebuilt.kwargs["n"] == 4
    assert describe(zeros_from(describe((torch.ones(1),)))) == {
        "tuple": [{"tensor": [1], "dtype": "float32"}]
    }


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


def test_output_tensor_finds_the_logits_in_any_output() -> None:
    t = torch.randn(2, 3)
    assert output_tensor(t) is t
    assert output_tensor(Output(t, t + 1)) is t
    assert output_tensor({"logits": t}) is t
    assert output_tensor((t, t + 1)) is t
    with pytest.raises(TensorslimError, match="logits"):
        output_tensor("nope")
