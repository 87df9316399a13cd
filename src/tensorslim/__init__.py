"""tensorslim — compress trained PyTorch networks by giving their weights structure.

import tensorslim as ts
plan = ts.plan(model, method="svd", budget=ts.Budget(flops=0.5), example_input=x)
small = ts.apply(model, plan)
ts.save(small, "out/")
again = ts.load("out/", base_model=fresh_model)
"""

__version__ = "0.1.0"

from tensorslim import layers as _layers
from tensorslim.analysis.deployment import Deployment
from tensorslim.analysis.timing import LatencyCache, time_models
from tensorslim.errors import TensorslimError
from tensorslim.io import load, save
from tensorslim.layers import *  # noqa: F403 (the structured layers, listed in layers.__all__)
from tensorslim.methods import get_method, list_methods
from tensorslim.plan import CompressionPlan, LayerPlan, apply, plan
from tensorslim.rank.budget import Budget
from tensorslim.refit import refit_factors, refit_right_factors
from tensorslim.train import distill, evaluate, fit
from tensorslim.train.batchnorm import recalibrate_batchnorm


def create_model(name: str, **kwargs):  # type: ignore[no-untyped-def]
    """Build a model from the zoo by name (see :func:`list_models`)."""
    from tensorslim.models import create_model as _create

    return _create(name, **kwargs)


def list_models() -> list[str]:
    """Names of the models in the zoo."""
    from tensorslim.models import list_models as _list

    return _list()


__all__ = [
    "Budget",
    "CompressionPlan",
    "Deployment",
    "LatencyCache",
    "LayerPlan",
    "TensorslimError",
    "__version__",
    "apply",
    "create_model",
    "distill",
    "evaluate",
    "fit",
    "get_method",
    "list_methods",
    "list_models",
    "load",
    "plan",
    "recalibrate_batchnorm",
    "refit_factors",
    "refit_right_factors",
    "save",
    "time_models",
    *_layers.__all__,
]
