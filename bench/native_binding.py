"""ctypes C library (what pylo_runtime.kernels.cpu does) versus a torch C++ extension with a torch.library
custom op, for the C passes: build time, per-call overhead, torch.compile tracing. A tool, not a test:

    python bench/native_binding.py            # prints a table; run it on a quiet machine for the numbers

The custom op is a minimal one (the g**2 row / column sums pass, ``gsq_sums``, same loop in C++), enough to
measure what the binding costs; the passes' own time is the same C either way.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CPP = r"""
#include <torch/extension.h>
#include <tuple>

std::tuple<torch::Tensor, torch::Tensor> gsq_sums(const torch::Tensor& g) {
    TORCH_CHECK(g.dim() == 2 && g.scalar_type() == torch::kFloat && g.is_contiguous(), "2-D float32");
    const int64_t nrow = g.size(0), ncol = g.size(1);
    auto rows = torch::zeros({nrow}, torch::kDouble), cols = torch::zeros({ncol}, torch::kDouble);
    const float* p = g.data_ptr<float>();
    double* r = rows.data_ptr<double>();
    double* c = cols.data_ptr<double>();
    for (int64_t i = 0; i < nrow; i++)
        for (int64_t j = 0; j < ncol; j++) {
            const double q = (double)(p[i * ncol + j] * p[i * ncol + j] + 1e-30f);
            r[i] += q;
            c[j] += q;
        }
    return {rows, cols};
}

TORCH_LIBRARY(lopt_bench, m) { m.def("gsq_sums(Tensor g) -> (Tensor, Tensor)"); }
TORCH_LIBRARY_IMPL(lopt_bench, CPU, m) { m.impl("gsq_sums", &gsq_sums); }
"""


def _median_us(fn, n: int = 2000) -> float:
    for _ in range(100):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def main() -> int:
    from lopt_bridge.pylo_runtime.kernels.cpu import build, passes

    out: dict = {"load_average": os.getloadavg(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOPT_BRIDGE_CACHE"] = tmp
        build.reset()
        t0 = time.perf_counter()
        path = build.build(force=True)
        out["ctypes_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lib = build._load(path)
        out["ctypes_load_s"] = time.perf_counter() - t0

        from torch.utils.cpp_extension import load_inline

        t0 = time.perf_counter()
        load_inline(
            "lopt_bench", cpp_sources=[CPP], is_python_module=False, build_directory=tmp, verbose=False
        )
        out["torch_extension_build_s"] = time.perf_counter() - t0

    g = torch.randn(4, 4)
    rows, cols = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    args = (16, 1, 4, passes.ptr(g), passes.ptr(rows), passes.ptr(cols))
    out["ctypes_call_us"] = _median_us(lambda: lib.gsq_sums(*args))
    out["ctypes_call_with_pointer_setup_us"] = _median_us(
        lambda: lib.gsq_sums(16, 1, 4, passes.ptr(g), passes.ptr(rows), passes.ptr(cols))
    )
    op = torch.ops.lopt_bench.gsq_sums

    @torch.library.register_fake("lopt_bench::gsq_sums")
    def _(x):  # what torch.compile needs to trace the op (shapes and dtypes of its outputs)
        return x.new_empty(x.shape[0], dtype=torch.float64), x.new_empty(x.shape[1], dtype=torch.float64)

    out["custom_op_call_us"] = _median_us(lambda: op(g))
    out["torch_add_call_us"] = _median_us(lambda: torch.add(g, g))

    def with_op(x):
        r, c = op(x)
        return r.sum() + c.sum()

    def with_ctypes(x):
        lib.gsq_sums(16, 1, 4, passes.ptr(x), passes.ptr(rows), passes.ptr(cols))
        return rows.sum()

    for name, fn in (("custom_op", with_op), ("ctypes", with_ctypes)):
        torch._dynamo.reset()
        try:
            torch.compile(fn, fullgraph=True, backend="eager")(g)
            out[f"compile_fullgraph_{name}"] = "traced"
        except Exception as exc:  # noqa: BLE001 - the point is whether it traces
            out[f"compile_fullgraph_{name}"] = f"fails: {type(exc).__name__}"
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
