"""Sequential calibration's step plans (onnxq.calibration.steps), on graphs exported by others (optimum,
onnxruntime-genai fp32/fp16, paddle2onnx, a torch export): every value a step reads from the kept frontier equals
a fresh computation at that step (no weight it depends on was committed since it was computed), each node runs at
most once over all steps, and where no tensor depends on a weight solved after its last use (no tied embedding) the
plan equals the per-step graph walks it replaced."""

from __future__ import annotations

import random
from types import SimpleNamespace

import onnx
import pytest
from onnx import helper

from models.zoo import ZOO
from onnxq.calibration.keys import plan_keys
from onnxq.calibration.steps import plan_steps
from onnxq.ir.index import backward_slice, reads
from onnxq.ir.targets import find_targets
from onnxq.passes.quantize import layer_groups_of

UNTIED = ["minilm-optimum", "smollm2-optimum", "ppocr-rec-init", "yolov8n-nudenet"]
TIED = ["smollm2-genai-fp32", "smollm2-genai-fp16"]  # the embedding Gather reads lm_head's weight, solved last


def _load(name: str):
    model = onnx.load(str(ZOO[name].build()), load_external_data=False)
    groups = layer_groups_of(find_targets(model).targets)
    keys = [plan_keys(group) for group in groups]
    node_reads = [reads(node) for node in model.graph.node]
    return model, groups, keys, node_reads, plan_steps(model.graph, groups, keys, node_reads)


def _walked_plans(graph: onnx.GraphProto, groups, keys, node_reads) -> list[tuple]:
    """Each step planned as sequential calibration did before plan_steps: per step, which tensors are stale
    (depend on a weight not yet solved), which nodes are on the way to a later group's input, and which tensors
    depend on a solved weight, each by walking the graph."""
    produced = {name for node in graph.node for name in node.output if name}
    plans, cached = [], set()
    for index, units in enumerate(keys):
        solved = {t.weight_name for group in groups[:index] for t in group}
        pending = {t.weight_name for group in groups[index:] for t in group} - solved
        later = {u.tensor for step_keys in keys[index + 1:] for u in step_keys.values()}
        useful = set(backward_slice(graph, later, set(), node_reads))
        stale, frontier = set(pending), set()
        for position, (node, names_read) in enumerate(zip(graph.node, node_reads, strict=True)):
            if not names_read.isdisjoint(stale):
                stale.update(node.output)
                if position in useful:
                    frontier |= {name for name in names_read if name in produced and name not in stale}
        changed = set(solved)
        for node, names_read in zip(graph.node, node_reads, strict=True):
            if not names_read.isdisjoint(changed):
                changed.update(node.output)
        layer_inputs = [t for t in dict.fromkeys(u.tensor for u in units.values()) if t in produced]
        outputs = [t for t in dict.fromkeys([*layer_inputs, *sorted(frontier)]) if t not in cached]
        nodes = backward_slice(graph, set(outputs), cached, node_reads)
        new_frontier = [t for t in outputs if t in frontier]
        kept = (cached | set(new_frontier)) & frontier
        plans.append((layer_inputs, frozenset(cached), outputs, nodes, new_frontier,
                      [t for t in layer_inputs if t in changed], frozenset(kept)))
        cached = kept
    return plans


def _check_plans(graph: onnx.GraphProto, groups, node_reads, plans) -> list[int]:
    """Replay the plans: every node's reads are available when it runs, and no cached value depends on a weight
    committed since it was computed.  Returns the node positions run, over all steps."""
    group_of = {}
    for index, group in enumerate(groups):
        for target in group:
            group_of.setdefault(target.weight_name, index)
    depends = {name: {group} for name, group in group_of.items()}
    for node, names_read in zip(graph.node, node_reads, strict=True):
        for output in node.output:
            depends[output] = set().union(*(depends.get(n, set()) for n in names_read))
    sources = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    computed_at: dict[str, int] = {}
    runs: list[int] = []
    for plan in plans:
        assert plan.cached <= set(computed_at)
        for tensor in plan.cached:  # no weight it depends on was committed after it was computed
            assert not any(computed_at[tensor] <= d < plan.index for d in depends[tensor]), (plan.index, tensor)
        available = set(plan.cached) | sources
        for position in plan.nodes:
            assert node_reads[position] <= available, (plan.index, graph.node[position].name)
            available |= set(graph.node[position].output)
        assert set(plan.outputs) <= available and set(plan.layer_inputs) <= available
        for tensor in plan.new_frontier:
            computed_at[tensor] = plan.index
        computed_at = {t: step for t, step in computed_at.items() if t in plan.kept}
        runs += plan.nodes
    return runs


@pytest.mark.real
@pytest.mark.parametrize("name", UNTIED + TIED)
def test_kept_values_stay_valid_and_each_node_runs_once(name):
    model, groups, _, node_reads, plans = _load(name)
    runs = _check_plans(model.graph, groups, node_reads, plans)
    assert len(runs) == len(set(runs))  # each node once over all steps
    assert len(groups) > 1 and any(plan.changed for plan in plans)


def _random_case(seed: int):
    """A random graph of up to 14 nodes (0–3 reads, 1–2 outputs each) over ``x`` and up to 7 weights, the weights
    spread over up to 5 groups (some in two), each group reading up to 2 random tensors."""
    rng = random.Random(seed)
    weights = [f"w{k}" for k in range(rng.randint(1, 7))]
    tensors, nodes = ["x"], []
    for k in range(rng.randint(1, 14)):
        pool = tensors + weights
        outputs = [f"t{k}_{j}" for j in range(rng.choice([1, 1, 1, 2]))]
        nodes.append(helper.make_node("Op", rng.sample(pool, rng.randint(0, min(3, len(pool)))), outputs))
        tensors += outputs
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", 1, [1])], [],
                              [helper.make_tensor(w, 1, [1], [0.0]) for w in weights])
    count = rng.randint(1, 5)
    groups = [[] for _ in range(count)]
    for w in weights:
        for group in rng.sample(range(count), min(count, rng.choice([1, 1, 2]))):
            groups[group].append(SimpleNamespace(weight_name=w))
    keys = [{(g, t): SimpleNamespace(tensor=t) for t in rng.sample(tensors, rng.randint(0, min(2, len(tensors))))}
            for g in range(count)]
    return graph, groups, keys


def test_random_graphs_keep_only_valid_values():
    """2,000 random graphs (shared weights, multi-output nodes, nodes that read nothing, layer inputs that are graph
    inputs or weights, empty groups): every plan replays with its reads available and valid cached values."""
    for seed in range(2000):
        graph, groups, keys = _random_case(seed)
        node_reads = [reads(node) for node in graph.node]
        _check_plans(graph, groups, node_reads, plan_steps(graph, groups, keys, node_reads))


@pytest.mark.real
@pytest.mark.parametrize("name", UNTIED)
def test_plans_equal_the_walked_definitions(name):
    model, groups, keys, node_reads, plans = _load(name)
    walked = _walked_plans(model.graph, groups, keys, node_reads)
    assert len(plans) == len(walked) == len(groups) > 1
    for plan, expected in zip(plans, walked, strict=True):
        got = (plan.layer_inputs, plan.cached, plan.outputs, plan.nodes, plan.new_frontier, plan.changed, plan.kept)
        assert got == expected, f"step {plan.index}"


@pytest.mark.real
def test_a_tied_embedding_is_computed_once():
    """onnxruntime-genai's SmolLM2: the walked definitions re-ran the embedding and every block before each step
    (the embedding reads lm_head's weight, solved last): 20,291 node runs for 342 nodes."""
    model, groups, keys, node_reads, plans = _load("smollm2-genai-fp32")
    walked = _walked_plans(model.graph, groups, keys, node_reads)
    assert sum(len(plan[3]) for plan in walked) > 50 * len(model.graph.node)
    assert sum(len(plan.nodes) for plan in plans) < len(model.graph.node)
