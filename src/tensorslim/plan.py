"""CompressionPlan — the hinge between a model and its compressed form.

``plan(model, method, budget, example_input)`` gathers per-layer facts (and, with
``calibration=``, statistics of real batches) and the method's candidates, and picks one option
per layer; ``apply(model, plan)`` swaps the layers. The plan is plain data (JSON / YAML),
readable and editable by a person, and is saved beside the weights so ``load`` can rebuild the
structure before the weights are read.

The stages live in :mod:`tensorslim.planner`; this module is the public front.
"""

from tensorslim.planner.apply import PLANS_ATTRIBUTE, apply, plans_of, refresh_plan, set_plans
from tensorslim.planner.pipeline import DEFAULT_CALIBRATION_BATCHES, plan
from tensorslim.planner.records import CompressionPlan, LayerPlan

__all__ = [
    "DEFAULT_CALIBRATION_BATCHES",
    "PLANS_ATTRIBUTE",
    "CompressionPlan",
    "LayerPlan",
    "apply",
    "plan",
    "plans_of",
    "refresh_plan",
    "set_plans",
]
