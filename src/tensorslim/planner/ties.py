"""Tied and shared weights: parameters held by more than one module.

A model may hand one parameter to several modules: a language model's output head and its token
embedding (GPT-2, BERT, an LSTM LM with a tied decoder), or a weight shared across blocks.
Replacing one holder by a structured layer would leave the others with the dense parameter, so the
model would *grow*. Two modes (``plan(..., tied=...)``):

- ``"dense"`` (default): every holder of a shared parameter stays dense, with the reason
  "weight tied with X".
- ``"share"``: the first Linear-like holder (the *leader*) is offered to the method; the others
  (*followers*) keep the tie exactly by sharing the leader's structure — a module of the leader's
  type holding exactly the leader's parameters becomes the leader's structured module itself
  (``"module"``), and an ``nn.Embedding`` tied to an svd-factorized head looks its rows up in the
  head's factors (``"factors"``, :class:`~tensorslim.layers.tied_embedding.FactoredEmbedding`).
  Where no exact sharing exists, the group stays dense and the plan says why.

A module shared by name (one object at two places) is not a tie: it is replaced once, everywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.layers.linear_like import is_linear_like
from tensorslim.layers.tied_embedding import FactoredEmbedding, tie_problem
from tensorslim.surgery import replace_module

if TYPE_CHECKING:
    from tensorslim.planner.records import CompressionPlan

TIED_MODES = ("dense", "share")
TIED_TO = "tied_to"  # config key of a follower: the fqn of its leader
SHARE_KIND = "share"  # config key of a follower: "module" or "factors"


def check_tied_mode(mode: str) -> str:
    """``mode`` if it is a known tied-weights mode, else a one-line error naming the choices."""
    if mode not in TIED_MODES:
        raise TensorslimError(f"unknown tied={mode!r}: use {' or '.join(TIED_MODES)}")
    return mode


def shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """fqn → the other modules (first names) that hold one of its own parameters."""
    owners: dict[int, list[str]] = {}
    for fqn, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(fqn)
    tied: dict[str, list[str]] = {}
    for names in owners.values():
        for name in names:
            others = tied.setdefault(name, [])
            others += [n for n in names if n != name and n not in others]
    return {fqn: others for fqn, others in tied.items() if others}


def tied_reason(others: list[str]) -> str:
    """The plan's reason for a layer kept dense because its weight is shared."""
    return f"weight tied with {', '.join(others)} (kept dense; tied='share' keeps the tie)"


@dataclass
class TiePlan:
    """In ``"share"`` mode: each follower's leader and kind; why the rest of the ties stay dense."""

    leader_of: dict[str, str] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)


def decide_ties(
    mode: str,
    modules: dict[str, nn.Module],
    tied: dict[str, list[str]],
    order: list[str],
    method: str,
) -> TiePlan:
    """What happens to every holder of a shared parameter under ``mode`` ("dense" / "share").

    ``order`` lists the layers a plan may compress (Linear-like and Conv2d, module order).
    """
    if check_tied_mode(mode) == "dense":
        return TiePlan(dense={fqn: tied_reason(others) for fqn, others in tied.items()})
    return _share_ties(modules, tied, order, method)


def _share_ties(
    modules: dict[str, nn.Module], tied: dict[str, list[str]], order: list[str], method: str
) -> TiePlan:
    """Leaders and followers of every tie group (see the module docstring)."""
    result = TiePlan()
    done: set[str] = set()
    for fqn in [*order, *sorted(tied)]:
        if fqn not in tied or fqn in done:
            continue
        group = _group(fqn, tied)
        done |= set(group)
        leader = next((g for g in order if g in group and is_linear_like(modules[g])), None)
        kinds, problem = _follower_kinds(group, leader, modules, method)
        if problem is not None:
            for member in group:
                others = [g for g in group if g != member]
                result.dense[member] = f"weight tied with {', '.join(others)}: {problem}"
            continue
        for member, kind in kinds.items():
            result.leader_of[member], result.kind[member] = leader, kind
    return result


def _follower_kinds(
    group: list[str], leader: str | None, modules: dict[str, nn.Module], method: str
) -> tuple[dict[str, str], str | None]:
    """Each follower's sharing kind, or why the group must stay dense."""
    if leader is None:
        return {}, "no Linear-like holder to compress; kept dense"
    kinds = {}
    for member in group:
        if member == leader:
            continue
        kind, why = _share_kind(modules[member], modules[leader], method)
        if kind is None:
            return {}, f"{why}, so the tie cannot be kept exactly; kept dense"
        kinds[member] = kind
    return kinds, None


def _group(start: str, tied: dict[str, list[str]]) -> list[str]:
    """The connected set of modules sharing parameters with ``start`` (in discovery order)."""
    group, frontier = [start], [start]
    while frontier:
        for other in tied.get(frontier.pop(), []):
            if other not in group:
                group.append(other)
                frontier.append(other)
    return group


def _share_kind(member: nn.Module, leader: nn.Module, method: str) -> tuple[str | None, str]:
    """How ``member`` can share ``leader``'s structure exactly: ("module" | "factors", "")."""
    own = {id(p) for p in member.parameters(recurse=False)}
    if type(member) is type(leader) and own == {id(p) for p in leader.parameters(recurse=False)}:
        return "module", ""
    if isinstance(member, nn.Embedding):
        problem = tie_problem(member, leader)
        if problem is None and method == "svd":
            return "factors", ""
        return None, problem or f"only svd factors can be shared with an embedding, not {method}"
    return None, f"{type(member).__name__} holds only part of {type(leader).__name__}'s weights"


def share_followers(model: nn.Module, plan: CompressionPlan) -> None:
    """Give every follower in ``plan`` its (already built) leader's structure, in place."""
    for lp in plan.compressed_layers:
        leader_fqn = lp.config.get(TIED_TO)
        if leader_fqn is None:
            continue
        leader = model.get_submodule(leader_fqn)
        if lp.config.get(SHARE_KIND) == "module":
            new = leader
        else:
            try:
                new = FactoredEmbedding.tied_to(model.get_submodule(lp.fqn), leader)
            except TensorslimError as exc:
                raise TensorslimError(f"layer {lp.fqn}: {exc}") from None
        replace_module(model, lp.fqn, new)


def check_growth(
    model: nn.Module,
    plan: CompressionPlan,
    before: int,
    tied: dict[str, list[str]],
    *,
    check: bool = True,
) -> None:
    """Refuse an applied plan that untied a weight; warn if ``model`` grew past ``before``
    through layers a decomposition made larger than dense. ``check=False``: do neither.

    ``tied`` is :func:`shared_parameters` of the model before the plan was applied.
    """
    after = count_params(model)
    if after <= before or not check:
        return
    planned = plan.compressed_layers
    followers = {lp.fqn: lp.config[TIED_TO] for lp in planned if TIED_TO in lp.config}
    untied = [
        f"{lp.fqn} (tied with {', '.join(tied[lp.fqn])})"
        for lp in plan.compressed_layers
        if lp.fqn in tied
        and lp.fqn not in followers
        and any(followers.get(other) != lp.fqn for other in tied[lp.fqn])
    ]
    growth = f"the plan grows the model from {before:,} to {after:,} parameters"
    if untied:
        raise TensorslimError(
            f"{growth}: replacing {'; '.join(untied)} leaves the dense shared weight in the "
            "other holders — plan again (tied weights stay dense by default) or with tied='share'"
        )
    # a training method's structure at apply is its training form (SVD training starts at full
    # rank, larger than dense); what it ends with is checked by its finalize, not here
    grown = [
        lp.fqn
        for lp in planned
        if lp.fqn not in followers
        and plan.method_for(lp).kind != "training"
        and count_params(model.get_submodule(lp.fqn)) > lp.params_before
    ]
    if not grown:
        return
    warnings.warn(
        f"{growth}: its structured layers {', '.join(grown)} hold more parameters "
        "than the dense layers they replace (options chosen for FLOPs, or an edited plan)",
        stacklevel=3,
    )
