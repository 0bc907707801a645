"""Explicit reducers (pylo_runtime.distributed.reducer): what a step reduces over is an argument, not state.

- On 2 gloo ranks, a ShardReducer over each rank's slice of a tensor gives what WHOLE gives on the full tensor
  (means over and beside the sharded axis, with a dropped axis, several at once, sums, column sums, shapes);
  GroupTensors reduces over the ranks' values.
- No module-level mutable state in pylo_runtime/distributed (the old _TENSOR_GROUP / _SHARDS / _CURRENT).
- Two optimizers stepped at once in two threads give what they give one after the other (bit for bit).
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import torch
from fused_support import adafac_theta, grad_stream, make_params, velo_theta

from lopt_bridge import pylo_runtime
from lopt_bridge.pylo_runtime.adafac import SmallFCLOpt
from lopt_bridge.pylo_runtime.velo import VeLO
from tests.distributed_support import run_ranks

SHAPE = (6, 4, 5)


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from lopt_bridge.pylo_runtime.distributed.reducer import WHOLE, GroupTensors, ShardReducer, ShardSpec

    gen = torch.Generator().manual_seed(0)
    full = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    out: dict = {}
    for dim in range(len(SHAPE)):
        local = full.chunk(world, dim=dim)[rank]
        red = ShardReducer(ShardSpec(dim, SHAPE, dist.group.WORLD))

        def local_of(t: torch.Tensor, axis: int | None) -> torch.Tensor:
            """This rank's part of a whole-tensor result whose axis ``axis`` is the sharded one."""
            if axis is None:
                return t
            return t.chunk(world, dim=axis)[rank]

        errs = []
        errs.append((red.mean(local) - WHOLE.mean(full)).abs().max())
        for d in range(len(SHAPE)):
            for keepdim in (False, True):
                got = red.mean(local, d, keepdim)
                want = WHOLE.mean(full, d, keepdim)
                axis = None if d == dim else (dim if keepdim or dim < d else dim - 1)
                errs.append((got - local_of(want, axis)).abs().max())
        # A statistic lacking axis ``d0`` (a factored row), reduced over another axis.
        for d0 in range(len(SHAPE)):
            row_full = full.mean(dim=d0)
            row_local = local.mean(dim=d0) if d0 != dim else row_full
            reduced = [i for i in range(len(SHAPE)) if i != d0]
            for k in range(len(reduced)):
                got = red.mean(row_local, k, keepdim=True, dropped=d0)
                want = WHOLE.mean(row_full, k, keepdim=True)
                sharded = None if d0 == dim else reduced.index(dim)
                errs.append(
                    (got - (want if sharded == k or sharded is None else local_of(want, sharded))).abs().max()
                )
        both = red.means([local, local * local], tuple(range(len(SHAPE))), keepdim=True)
        errs.append((both[1] - WHOLE.means([full * full], tuple(range(len(SHAPE))), True)[0]).abs().max())
        errs.append((red.sum(local) - WHOLE.sum(full)).abs())
        cols = local.reshape(-1, SHAPE[-1]) if dim != len(SHAPE) - 1 else None
        if cols is not None:
            sums, count = red.column_sums(cols.sum(0).clone(), tuple(local.shape))
            want_sums, want_count = WHOLE.column_sums(full.reshape(-1, SHAPE[-1]).sum(0), SHAPE)
            errs.append((sums - want_sums).abs().max())
            out[f"count{dim}"] = [count, want_count]
        out[f"shape{dim}"] = [list(red.global_shape(local.shape)), red.numel(local), full.numel()]
        out[f"dim{dim}"] = float(max(errs))
    across = GroupTensors(dist.group.WORLD)
    out["max"] = float(across.max(torch.tensor([float(rank)])))
    out["sum"] = float(across.sum(torch.tensor([1.0 + rank])))
    return out


def test_shard_reducer_equals_whole_tensor_reductions():
    for rank, out in enumerate(run_ranks(_worker, world=2)):
        for dim in range(len(SHAPE)):
            assert out[f"dim{dim}"] <= 1e-12, (rank, dim, out)
            assert out[f"shape{dim}"] == [list(SHAPE), 120, 120]
            if f"count{dim}" in out:
                assert out[f"count{dim}"][0] == out[f"count{dim}"][1]
        assert out["max"] == 1.0 and out["sum"] == 3.0


def test_no_module_level_mutable_state_in_distributed():
    root = Path(pylo_runtime.__file__).parent / "distributed"
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "reducer.py", "fsdp.py", "sharded.py"}
    for f in files:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(
                node.value, ast.List | ast.Dict | ast.Set
            ):
                names = [
                    t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if t is not None
                ]
                assert names == ["__all__"], (f.name, names)


def test_concurrent_steps_in_threads_equal_sequential_steps():
    shapes = [(), (7,), (16, 9), (3, 40)]
    grads = grad_stream(shapes, 3)

    def build(params):
        vt, vc = velo_theta(param_scale_mult=False, step_mult=0.3)
        at, ac = adafac_theta(8)
        return VeLO(params[0], vt, vc, num_steps=10), SmallFCLOpt(params[1], at, ac, num_steps=10)

    def run(opt, params):
        for t, gs in enumerate(grads):
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step(loss=2.0 - 0.1 * t)

    seq = [make_params(shapes), make_params(shapes)]
    for opt, ps in zip(build(seq), seq, strict=True):
        run(opt, ps)
    par = [make_params(shapes), make_params(shapes)]
    threads = [threading.Thread(target=run, args=(opt, ps)) for opt, ps in zip(build(par), par, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(seq, par, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
