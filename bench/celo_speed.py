"""Celo / Celo-Adam step time against torch's AdamW (foreach and fused) in one run, and what bounds it.

    python bench/celo_speed.py                      # rates + interleaved steps on the 3.1M tree
    python bench/celo_speed.py steps --threads 1 --repeats 40
    python bench/celo_speed.py rates                # copy bandwidth and sgemm rates only
    python bench/celo_speed.py callgrind            # instructions per element of the C passes (valgrind)

``steps``: every optimizer on its own copy of the tree, stepped in turn (interleaved, so that a change in the
machine's load hits all of them alike), ``--repeats`` times after a warm-up; medians and ratios to AdamW
foreach / fused. The bounds:

- Celo-Adam (element-wise): bytes moved per parameter (28 for float32: read p, g, m, v; write p, m, v, as
  AdamW) at the measured copy bandwidth; the non-finite guard (``nonfinite="skip"``, the default) reads the
  gradients once more (4 B/param);
- Celo (per-element MLP 18 -> H -> H -> 3 on VeLO's C passes): the MLP's flops per parameter
  (2 (18 H + H^2 + 3 H)) at the measured sgemm rate, and the bytes its three passes move (g**2 sums: 4;
  accumulators: 24 read + 16 written; MLP pass: 24 read + 4 written; the gradient clip: 8).

The fraction reached is bound / measured. ``callgrind`` counts instructions (deterministic, unlike time on a
shared machine) of each C pass per element, on a build for AVX2 (valgrind does not decode AVX-512).
Writes ``bench/results/<host>-<date>-celo-speed.json``. A tool, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from step_time import write_result  # noqa: E402
from theta import random_theta  # noqa: E402
from trees import num_params, tree_shapes  # noqa: E402

#: name -> (architecture or "adamw", constructor options)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw_foreach": ("adamw", {"foreach": True}),
    "adamw_fused": ("adamw", {"fused": True}),
    "celo_adam": ("celo_adam", {"foreach": False}),
    "celo_adam_foreach": ("celo_adam", {"foreach": True}),
    "celo_adam_fused": ("celo_adam", {"fused": None}),
    "celo_foreach": ("celo", {"foreach": True}),
    "celo_fused": ("celo", {"fused": None}),
    "celo": ("celo", {"foreach": False}),
}
DEFAULT = "adamw_foreach,adamw_fused,celo_adam_foreach,celo_adam_fused,celo_fused"
#: Bytes per float32 parameter a pass moves (module docstring).
CELO_ADAM_BYTES = 28
NONFINITE_GUARD_BYTES = 4
CELO_BYTES = 4 + (24 + 16) + (24 + 4) + 8


def celo_mlp_flops(hidden: int) -> int:
    """Flops per parameter of Celo's per-element MLP on the C passes (18 features, row / column shares)."""
    return 2 * (18 * hidden + hidden * hidden + 3 * hidden)


# ------------------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rates(elements: int = 1 << 25, repeats: int = 7) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second, one large float32 copy) and sgemm rates (GFLOP/s:
    a square 1024^3 product and a tall-skinny (n x 18) @ (18 x 4) one, the shape of Celo's first layer)."""
    src = torch.randn(elements)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), repeats)
    out = {"copy_GBps": 2 * 4 * elements / t / 1e9}
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    c = torch.empty(1024, 1024)
    out["sgemm_square_GFLOPs"] = 2 * 1024**3 / _median_time(lambda: torch.mm(a, b, out=c), repeats) / 1e9
    n = 1 << 20
    x, w = torch.randn(n, 18), torch.randn(18, 4)
    y = torch.empty(n, 4)
    out["sgemm_tall_skinny_GFLOPs"] = (
        2 * n * 18 * 4 / _median_time(lambda: torch.mm(x, w, out=y), repeats) / 1e9
    )
    return out


# ------------------------------------------------------------------------------------------------------
def _tree(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes.values():
        p = (torch.randn(s, generator=gen) * 0.05).requires_grad_()
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def _build(name: str, shapes) -> tuple[Any, bool]:
    arch, options = OPTIMIZERS[name]
    params = _tree(shapes)
    if arch == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, **options), False
    from lopt_bridge.pylo_runtime.loading import optimizer_class

    theta, config = random_theta(arch)
    return optimizer_class(arch)(params, theta, config, num_steps=10000, **options), True


def steps(names: list[str], tree: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Interleaved step times (medians), ratios to AdamW foreach / fused, the path each optimizer ran."""
    shapes = tree_shapes(tree)
    opts = {n: _build(n, shapes) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}

    def one(n: str, i: int) -> float:
        opt, uses_loss = opts[n]
        t0 = time.perf_counter()
        opt.step(loss=torch.tensor(2.0 - 1e-4 * i)) if uses_loss else opt.step()
        return time.perf_counter() - t0

    for i in range(warmup):
        for n in names:
            one(n, i)
    for i in range(repeats):
        for n in names:
            times[n].append(one(n, warmup + i))
    out: dict[str, Any] = {}
    for n in names:
        ts = sorted(times[n])
        out[n] = {"median_s": statistics.median(ts), "p20_s": ts[len(ts) // 5], "times_s": times[n]}
        opt = opts[n][0]
        out[n]["path"] = getattr(opt, "last_path", OPTIMIZERS[n][1])
    for n in names:
        for base in ("adamw_foreach", "adamw_fused"):
            if base in out:
                out[n][f"x_{base}"] = out[n]["median_s"] / out[base]["median_s"]
    return out


def bounds(res: dict[str, Any], r: dict[str, float], n: int, hidden: int) -> dict[str, Any]:
    """Seconds each bound allows on ``n`` parameters, and the fraction of it each measured path reaches."""
    bw = r["copy_GBps"] * 1e9
    b = {
        "celo_adam_bytes_s": n * CELO_ADAM_BYTES / bw,
        "celo_adam_bytes_with_guard_s": n * (CELO_ADAM_BYTES + NONFINITE_GUARD_BYTES) / bw,
        "celo_mlp_flops_s": n * celo_mlp_flops(hidden) / (r["sgemm_square_GFLOPs"] * 1e9),
        "celo_bytes_s": n * CELO_BYTES / bw,
        "adamw_bytes_s": n * CELO_ADAM_BYTES / bw,
    }
    for name, key in (
        ("celo_adam_fused", "celo_adam_bytes_with_guard_s"),
        ("celo_fused", "celo_mlp_flops_s"),
        ("adamw_fused", "adamw_bytes_s"),
    ):
        if name in res:
            b[f"{name}_fraction_of_bound"] = b[key] / res[name]["median_s"]
    if "celo_fused" in res:
        b["celo_fused_fraction_of_bytes_bound"] = b["celo_bytes_s"] / res["celo_fused"]["median_s"]
    return b


# ------------------------------------------------------------------------------------------------------
CALLGRIND_DRIVER = r"""
/* Calls one C pass of lopt_cpu.c (compiled in) on n elements of random data: argv = which n ncol. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int gsq_sums(int64_t, int, int64_t, const float *, double *, double *);
int velo_pass1(int64_t, int, int64_t, int, int, int, const float *, const float *, float *, float *,
               const float *, const float *, const float *, const float *, float, float, double *, double *);
int velo_pass2(int64_t, int, int64_t, int, int, int, int, const float *, const float *, const float *,
               const float *, const float *, const float *, const float *, const float *, const float *,
               const float *, const float *, const float *, const float *, float, float, float, float, int,
               float,
               float *);
int celo_adam_step(int64_t, int, int64_t, int, int, const float *, const float *, float *, float *,
                   const float *, const float *, const float *, const float *, float, float, float, float,
                   float,
                   float, float *);
static float *rnd(int64_t k, float lo, float hi) {
    float *x = malloc((size_t)k * sizeof(float));
    for (int64_t i = 0; i < k; i++) x[i] = lo + (hi - lo) * (float)rand() / (float)RAND_MAX;
    return x;
}
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *which = argv[1];
    const int64_t n = atoll(argv[2]), ncol = atoll(argv[3]), nrow = n / ncol;
    const int H = 4;
    float *p = rnd(n, -1e-2f, 1e-2f), *g = rnd(n, -1e-3f, 1e-3f), *m = rnd(3 * n, -1e-3f, 1e-3f);
    float *v = rnd(n, 1e-8f, 1e-6f), *fa = rnd(3 * nrow, 0.5f, 2.0f), *fb = rnd(3 * ncol, 0.5f, 2.0f);
    float md[3] = {0.9f, 0.99f, 0.999f}, mc[3] = {0.1f, 0.01f, 0.001f}, d1[1] = {0.9f}, c1[1] = {0.1f};
    float r1[1] = {0.999f}, q1[1] = {0.001f};
    float *we = rnd(18 * H, -1, 1), *a0 = rnd(nrow * H, -1, 1), *a1t = rnd(H * ncol, -1, 1);
    float *w2 = rnd(H * H, -1, 1), *b2 = rnd(H, -1, 1), *w3 = rnd(H * 3, -1, 1), *b3 = rnd(3, -1, 1);
    double *rows = calloc((size_t)nrow, sizeof(double)), *cols = calloc((size_t)ncol, sizeof(double));
    double sums[18] = {0}, stats[9] = {0};
    int rc = -99;
    if (!strcmp(which, "gsq_sums")) rc = gsq_sums(n, 1, ncol, g, rows, cols);
    else if (!strcmp(which, "velo_pass1"))
        rc = velo_pass1(n, 1, ncol, 3, 1, 3, p, g, m, v, fa, fb, md, mc, 0.999f, 0.001f, sums,
                        argc > 4 ? stats : NULL); /* argv[4]: with VeLO's LSTM statistics */
    else if (!strcmp(which, "velo_pass2"))
        rc = velo_pass2(n, 1, ncol, 3, 1, 3, H, p, g, m, v, fa, fb, we, a0, a1t, w2, b2, w3, b3, 0.001f,
                        0.001f,
                        0.05f, 0.1f, 0, 1.0f, p);
    else if (!strcmp(which, "celo_adam_step"))
        rc = celo_adam_step(n, 1, 1, 1, 1, p, g, m, v, d1, c1, r1, q1, 0.3f, 0.01f, 1e-4f, 1e-8f, 1.0f, 1.0f,
                            p);
    printf("%d %g\n", rc, (double)p[n / 2]);
    return rc != 0;
}
"""
#: The passes counted (velo_pass1 as Celo calls it, without the LSTM statistics, and as VeLO does), with their
#: C names and extra arguments.
CALLGRIND_PASSES = {
    "gsq_sums": "gsq_sums",
    "velo_pass1_celo": "velo_pass1",
    "velo_pass1_velo": "velo_pass1 stats",
    "velo_pass2": "velo_pass2",
    "celo_adam_step": "celo_adam_step",
}


def callgrind(n: int = 1 << 16, ncol: int = 256) -> dict[str, float]:
    """Instructions per element of each C pass (callgrind, one thread): a C driver with lopt_cpu.c compiled
    in for AVX2 (valgrind does not decode AVX-512), instructions inside the pass's call / n."""
    if not shutil.which("valgrind"):
        raise RuntimeError("valgrind is not installed")
    cc = os.environ.get("CC", "cc")
    src = HERE.parent / "pylo_runtime" / "kernels" / "cpu" / "lopt_cpu.c"
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.c"
        driver.write_text(CALLGRIND_DRIVER)
        exe = Path(tmp) / "driver"
        flags = ["-O3", "-march=x86-64-v3", "-std=gnu11", "-fno-math-errno"]
        subprocess.run([cc, *flags, str(src), str(driver), "-o", str(exe), "-lm"], check=True)
        for name, call in CALLGRIND_PASSES.items():
            fn, *extra = call.split()
            log = Path(tmp) / f"{name}.cg"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={log}", "--collect-atstart=no",
                   f"--toggle-collect={fn}", str(exe), fn, str(n), str(ncol), *extra]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("summary:")]
            out[name] = int(lines[0].split()[1]) / n
    return out


# ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "steps", "rates", "callgrind"])
    ap.add_argument("--tree", default="small", choices=["small", "vit"])
    ap.add_argument("--optimizers", default=DEFAULT, help=f"comma list from: {', '.join(OPTIMIZERS)}")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    record: dict[str, Any] = {"tree": a.tree, "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        record["load_average"] = os.getloadavg()
    except OSError:
        pass
    n = num_params(tree_shapes(a.tree))
    if a.what in ("all", "rates", "steps"):
        r = rates()
        record["rates"] = r
        print(
            f"copy {r['copy_GBps']:.1f} GB/s, sgemm square {r['sgemm_square_GFLOPs']:.1f} GFLOP/s, "
            f"tall-skinny (n x 18 x 4) {r['sgemm_tall_skinny_GFLOPs']:.1f} GFLOP/s",
            flush=True,
        )
    if a.what in ("all", "steps"):
        names = [x.strip() for x in a.optimizers.split(",") if x.strip()]
        unknown = sorted(set(names) - set(OPTIMIZERS))
        if unknown:
            ap.error(f"unknown optimizers {unknown}; known: {list(OPTIMIZERS)}")
        res = steps(names, a.tree, a.repeats, a.warmup)
        record["steps"] = res
        threads = torch.get_num_threads()
        print(f"\ntree {a.tree}: {n / 1e6:.2f}M params, {threads} threads, {a.repeats} interleaved")
        print(f"{'optimizer':<20} {'median':>10} {'p20':>10} {'x foreach':>10} {'x fused':>9}  path")
        nan = float("nan")
        for name, v in res.items():
            xf, xu = v.get("x_adamw_foreach", nan), v.get("x_adamw_fused", nan)
            t50, t20 = v["median_s"] * 1e3, v["p20_s"] * 1e3
            print(f"{name:<20} {t50:>8.2f}ms {t20:>8.2f}ms {xf:>10.2f} {xu:>9.2f}  {v['path']}")
        from lopt_bridge.pylo_runtime import specs

        hidden = specs.celo.DEFAULTS["ff_hidden_size"]
        b = bounds(res, record["rates"], n, hidden)
        record["bounds"] = b
        print(
            f"\nbounds on {n / 1e6:.2f}M params: Celo-Adam {CELO_ADAM_BYTES} "
            f"(+{NONFINITE_GUARD_BYTES} guard) B/param: {b['celo_adam_bytes_with_guard_s'] * 1e3:.2f} ms; "
            f"Celo MLP {celo_mlp_flops(hidden)} "
            f"flops/param at the square sgemm rate: {b['celo_mlp_flops_s'] * 1e3:.2f} ms, its passes' "
            f"{CELO_BYTES} B/param: {b['celo_bytes_s'] * 1e3:.2f} ms"
        )
        for k, v in b.items():
            if k.endswith("fraction_of_bound") or k.endswith("fraction_of_bytes_bound"):
                print(f"  {k}: {v:.2f}")
    if a.what in ("all", "callgrind") and (a.what == "callgrind" or shutil.which("valgrind")):
        cg = callgrind()
        record["callgrind_instructions_per_element"] = cg
        per = ", ".join(f"{k} {v:.1f}" for k, v in cg.items())
        print(f"\ncallgrind, instructions per element (AVX2 build, one thread): {per}")
    write_result(a.out, "celo-speed", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
