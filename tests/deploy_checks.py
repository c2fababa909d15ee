"""Checks shared by the deploy tests."""
from torch import fx

from lowbit.deploy.integer import QTensor


def local_mismatches(lowering, engine, x) -> dict:
    """Each node of the engine checked on its own integer inputs: its float op (and fused clamp)
    on the dequantized inputs, rounded onto its output grid, against the engine's integers.
    Returns, per kind, [elements off by more than half a step, elements checked, worst error in
    steps]."""
    values, found = {}, {}
    engine.run(x, values)
    real = lambda a: a.dequantize() if isinstance(a, QTensor) else a  # noqa: E731
    for node in lowering.graph_module.graph.nodes:
        out = values.get(node)
        grid = out.grid if isinstance(out, QTensor) else None
        if grid is None or node.op == "placeholder" or node in engine.clamps:
            continue
        args = fx.node.map_aggregate(fx.node.map_arg(node.args, lambda a: values[a]), real)
        kwargs = fx.node.map_aggregate(fx.node.map_arg(node.kwargs, lambda a: values[a]), real)
        y = engine._call(node, args, kwargs)
        if node in engine.fused:
            y = engine._call(engine.fused[node], [y], {})
        steps = (grid.fake_quantize(y) - out.dequantize()).abs() / grid.scale
        kind = found.setdefault(lowering.kinds[node], [0, 0, 0.0])
        kind[0] += int((steps > 0.5).sum())
        kind[1] += steps.numel()
        kind[2] = max(kind[2], float(steps.max().detach()))
    return found


def assert_kernels_exact(lowering, engine, x) -> None:
    """Every engine kernel, fed its own integers, within one rounding of the simulation's op;
    off by one only rarely (where float32 error moves a value across a half step)."""
    for kind, (off, seen, worst) in local_mismatches(lowering, engine, x).items():
        assert worst <= 1.0 + 1e-4, kind  # never more than a rounding apart
        # bilinear weights (1/4, 3/4) land many values exactly on half steps, which the float
        # simulation then breaks either way (see lowbit.deploy.integer)
        assert off <= (0.05 if kind == "resize" else 1e-3) * seen, (kind, off, seen)
