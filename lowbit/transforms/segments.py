"""Cut a traced network into a chain of segments, each handing one tensor to the next.

Layer-by-layer calibration runs the network one segment at a time over the whole calibration
set, keeping only the current segment's input (:mod:`lowbit.methods.activation_store`). A
*cut point* is a place in the graph's execution order where exactly one computed value is still
needed by the rest of the graph and that value is a tensor (known from one run of
``torch.fx.passes.shape_prop.ShapeProp`` on an example): between two residual blocks, or after
any layer of a plain chain. Inside a residual block the block input and the branch are both live,
so no cut falls there.

:func:`segments` cuts at the first cut point after each segment has called one of ``layers``
(so a segment holds at least one layer to calibrate and no segment is only a ReLU). Each segment
is an ``fx.Graph`` with one placeholder (the previous segment's output; the first takes the
network input) that returns the next segment's input (the last returns the network output);
``fx.GraphModule(root, graph)`` makes it runnable on any module with the same structure (the
float model and its quantized copy share one set of segments). Constants (``get_attr``) are
re-read in every segment that uses them.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata


def segments(graph_module: fx.GraphModule, example: torch.Tensor, layers: set[str]):
    """The segment graphs of ``graph_module`` (module docstring), or None when it does not take
    exactly one input."""
    nodes = [n for n in graph_module.graph.nodes if n.op != "get_attr"]
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    ShapeProp(graph_module).propagate(example)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position.get(u, -1) for u in n.users), default=-1) for n in nodes}
    graphs, start, carrier, has_layer, live = [], 0, None, False, set()
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        live = {n for n in live if last_use[n] > i}
        if last_use[node] > i:
            live.add(node)
        has_layer |= node.op == "call_module" and node.target in layers
        (single,) = live if len(live) == 1 else (None,)
        if has_layer and single is not None and \
                isinstance(single.meta.get("tensor_meta"), TensorMetadata):
            graphs.append(_subgraph(nodes[start:i + 1], carrier, single))
            start, carrier, has_layer = i + 1, single, False
    graphs.append(_subgraph(nodes[start:], carrier, None))
    return graphs


def _subgraph(nodes: list, carrier: fx.Node | None, result: fx.Node | None) -> fx.Graph:
    """``nodes`` as a graph taking ``carrier`` (None: the network input is among ``nodes``) and
    returning ``result`` (None: the network output is)."""
    graph, env = fx.Graph(), {}
    if carrier is not None:
        env[carrier] = graph.placeholder(carrier.name)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":
            env[a] = graph.get_attr(a.target)
        return env[a]

    for node in nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], arg))
            return graph
        env[node] = graph.node_copy(node, arg)
    graph.output(env[result])
    return graph
