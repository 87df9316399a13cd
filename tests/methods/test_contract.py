"""The method contract, checked for every registered method (a new method is checked by adding
it to the registry): supports → candidates → build (with and without weights) → plan → apply →
save/load, on a small CNN."""

from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.analysis.calibration import collect_statistics
from tensorslim.analysis.profile import collect_layer_info
from tensorslim.facts import Option
from tensorslim.layers.base import StructuredLayer
from tensorslim.methods.registry import builder_of, list_methods, method_class


def method_instance(name: str):
    cls = method_class(name)
    return ts.get_method(name, **(cls.demo_settings or {}))


def square_loss(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return output.pow(2).mean()


def calibration_kwargs(name: str, tiny_input: torch.Tensor) -> dict:
    """Calibration batches (and a loss for the Fisher) for methods that declare needs."""
    needs = method_class(name).calibration_needs
    if not needs:
        return {}
    return {"calibration": [tiny_input, tiny_input.flip(0)], "loss_fn": square_loss}


def layer_statistics(name: str, model, tiny_input, fqns) -> dict:
    kwargs = calibration_kwargs(name, tiny_input)
    if not kwargs:
        return {}
    needs = {"gram", *method_class(name).calibration_needs}
    layers = {f: model.get_submodule(f) for f in fqns}
    return collect_statistics(
        model, kwargs["calibration"], layers, needs, loss_fn=kwargs["loss_fn"], progress=False
    )


@pytest.mark.parametrize("name", list_methods())
def test_candidates_and_builds_honour_the_contract(name: str, tiny_cnn, tiny_input) -> None:
    method = method_instance(name)
    infos, _ = collect_layer_info(tiny_cnn, tiny_input[:1])
    stats = layer_statistics(name, tiny_cnn, tiny_input, infos)
    supported = 0
    for fqn, info in infos.items():
        module = tiny_cnn.get_submodule(fqn)
        reason = method.supports(module, fqn)
        if reason is not None:
            assert isinstance(reason, str) and reason, f"{name} must say why it skips {fqn}"
            continue
        extra = {"stats": stats[fqn]} if fqn in stats else {}
        options = method.candidates(module, info, *extra.values())
        # an empty list is allowed (the planner then says the method offers nothing here)
        supported += bool(options)
        for option in options[:3]:
            assert isinstance(option, Option) and option.error >= 0
            assert isinstance(option.params, int) and isinstance(option.flops, int)
            builder = method if option.method == name else ts.get_method(option.method)
            for init in (True, False):
                built = builder.build(module, option.config, info, init=init, **extra)
                out = built(torch.randn(info.input_shape))
                assert out.shape == info.output_shape
            if isinstance(built, StructuredLayer):
                assert builder_of(built, prefer=option.method) == option.method
                assert type(built) in type(builder).builds
    assert supported, f"{name} offers options for no layer of a plain CNN"


@pytest.mark.parametrize("name", list_methods())
def test_plan_apply_save_load_round_trip(name: str, tiny_cnn, tiny_input, tmp_path) -> None:
    cls = method_class(name)
    budget = ts.Budget(**{cls.budget_metric: 0.5})
    kwargs = calibration_kwargs(name, tiny_input)
    plan = ts.plan(tiny_cnn, name, budget, tiny_input, **kwargs, **(cls.demo_settings or {}))
    assert plan.compressed_layers, f"{name} compressed nothing: {[lp.reason for lp in plan.layers]}"
    small = ts.apply(tiny_cnn, plan)
    small.eval()
    ts.save(small, tmp_path)
    again = ts.load(tmp_path, type(tiny_cnn)())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tiny_input), small(tiny_input), rtol=0, atol=0)
