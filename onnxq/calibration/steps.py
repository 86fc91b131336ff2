"""What each step of a sequential calibration runs, planned from the graph alone (no values, no weights).

Layer groups ``0 … n−1`` are solved in order; a weight ``w`` is solved by the first group holding it, ``g(w)``, and
committed between steps ``g(w)`` and ``g(w) + 1``.  For a tensor ``t`` let ``D(t)`` be the groups of the weights it
depends on, and ``need(t)`` the last step whose layer inputs ``t`` is on the way to (``−1`` if none; a node's is the
largest of its outputs').  Then:

- ``t`` differs from the float model's value at step ``i`` (it is *changed*) iff ``min D(t) < i``;
- a value of ``t`` computed at step ``i`` serves every later step that needs it iff no ``d ∈ D(t)`` has
  ``i ≤ d < need(t)``; so with ``late(t) = max {d ∈ D(t) : d < need(t)}`` (``−1`` if none), ``t`` is *stale* at
  step ``i`` iff ``late(t) ≥ i`` (a node's ``late`` uses its own ``need`` and what it reads).  A weight used only
  after the last step that needs ``t`` does not make ``t`` stale: a tied embedding that reads ``lm_head``'s weight
  (onnxruntime-genai's exports), solved last, is computed once, not at every step.

The frontier ``F_i`` (kept after step ``i``) holds the computed tensors ``r`` that a stale node still needed later
reads while ``r`` is settled: ``r ∈ reads(n)``, ``late(r) < i ≤ late(n)`` and ``i < need(n)``; since
``late(n) < need(n)`` by definition, each (node, read) pair puts ``r`` in the frontiers of one interval of steps,
``late(r) + 1 ≤ i ≤ late(n)``.  Every kept value is computed at a step where it is settled, so it equals a fresh
computation at every step that reads it.  On the transformer exports tested every node runs once over all steps;
in contrived graphs (a node that settles before the step that first needs it) a node can run twice, never on a
stale value.

A step computes its layer inputs and its new frontier tensors from the frontier kept before it (``cached``) and the
graph inputs; :func:`onnxq.ir.index.backward_slice` picks its nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnxq.calibration.keys import HessianKey
from onnxq.ir.index import backward_slice
from onnxq.ir.targets import Target
from onnxq.stats.unfold import Unfolding

NEVER = 1 << 30  # early() of a tensor that depends on no group weight


@dataclass(frozen=True)
class StepPlan:
    """Step ``index``: run ``nodes`` (graph indices) fed by the graph inputs and the ``cached`` frontier tensors, for
    ``outputs`` (the step's computed layer inputs, then its ``new_frontier`` tensors); afterwards keep ``kept``.
    ``changed``: the layer inputs that differ from the float model's (they get a ``C``)."""

    index: int
    units: Mapping[HessianKey, Unfolding]
    layer_inputs: list[str]
    cached: frozenset[str]
    outputs: list[str]
    nodes: list[int]
    new_frontier: list[str]
    changed: list[str]
    kept: frozenset[str]


def plan_steps(
    graph: onnx.GraphProto,
    layer_groups: Sequence[Sequence[Target]],
    keys: Sequence[Mapping[HessianKey, Unfolding]],
    node_reads: Sequence[set[str]],
) -> list[StepPlan]:
    """One :class:`StepPlan` per layer group (``keys[i]``: group ``i``'s Hessian keys, ``node_reads[k]``:
    :func:`onnxq.ir.index.reads` of node ``k``)."""
    group_of: dict[str, int] = {}
    for index, group in enumerate(layer_groups):
        for target in group:
            group_of.setdefault(target.weight_name, index)
    produced = {name for node in graph.node for name in node.output if name}
    need = {u.tensor: index for index, units in enumerate(keys) for u in units.values()}
    node_need = [-1] * len(graph.node)
    for position in range(len(graph.node) - 1, -1, -1):
        node_need[position] = max((need.get(name, -1) for name in graph.node[position].output), default=-1)
        for name in node_reads[position]:
            need[name] = max(need.get(name, -1), node_need[position])
    # D(t) as a bitmask (bit d set iff d ∈ D(t)): a union is an OR; 320 groups are one 68-byte int per tensor
    depends: dict[str, int] = {name: 1 << group for name, group in group_of.items()}
    node_late = []
    for position, (node, names_read) in enumerate(zip(graph.node, node_reads, strict=True)):
        groups = 0
        for name in names_read:
            groups |= depends.get(name, 0)
        node_late.append(_late(groups, node_need[position]))
        for name in node.output:
            depends[name] = groups
    late = {name: _late(groups, need.get(name, -1)) for name, groups in depends.items()}
    frontiers: list[set[str]] = [set() for _ in layer_groups]
    for position, names_read in enumerate(node_reads):
        for name in names_read & produced:
            for step in range(late[name] + 1, node_late[position] + 1):
                frontiers[step].add(name)
    early = {name: (groups & -groups).bit_length() - 1 if groups else NEVER for name, groups in depends.items()}
    plans: list[StepPlan] = []
    cached: frozenset[str] = frozenset()
    for index, units in enumerate(keys):
        frontier = frontiers[index]
        layer_inputs = [t for t in dict.fromkeys(u.tensor for u in units.values()) if t in produced]
        outputs = [t for t in dict.fromkeys([*layer_inputs, *sorted(frontier)]) if t not in cached]
        nodes = backward_slice(graph, set(outputs), cached, node_reads)
        new_frontier = [t for t in outputs if t in frontier]
        changed = [t for t in layer_inputs if early.get(t, NEVER) < index]
        kept = frozenset((cached | set(new_frontier)) & frontier)
        plans.append(StepPlan(index, units, layer_inputs, cached, outputs, nodes, new_frontier, changed, kept))
        cached = kept
    return plans


def _late(groups: int, need: int) -> int:
    """``max {d ∈ groups : d < need}`` for the bitmask ``groups``, ``−1`` if none."""
    return (groups & ((1 << max(need, 0)) - 1)).bit_length() - 1
