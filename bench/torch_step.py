#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One SAE training step in PyTorch next to the same step in hsae, in one run.

What it measures (float32, CPU, median wall time of --iters steps after 1 warm-up):
  * encoder GEMM       (x - b_dec) @ W_enc.T alone: the floor every step pays.
  * single-K step      plain TopK(K) MSE from the sparse decode
                       x_hat = b_dec + (vals[..., None] * W_dec[idx]).sum(1).
  * all-prefix step    the HierarchicalTopK loss in the "cumsum" form users write:
                       x_hat_k = b_dec + cumsum_t(vals[:, t, None] * W_dec[idx[:, t]]),
                       loss = mean over k = 1..K of mean((x - x_hat_k)^2).
A step is: pre = relu((x - b_dec) @ W_enc.T + b_enc); vals, idx = topk(pre, K, sorted);
loss; autograd backward; remove from each W_dec row's gradient its component along the
row; torch.optim.Adam (lr 1e-4, eps 6.25e-10); renormalise W_dec rows to unit norm.
This is what hsae::train_step does (objective: arXiv 2505.24473). hsae's numbers come
from its Google Benchmark binary bench_step (benchmarks encoder_gemm,
train_step<top_k<64>>, train_step<all_prefixes<64>>), run as a subprocess with
OMP_NUM_THREADS = --threads.

Shapes: default B=4096, D=768, F=16384, K=64 (bench_step shape:0; the [B, K, D] cumsum
tensor alone is 805 MB and autograd keeps several: ~7 GB peak RSS);
--small: B=256, D=64, F=1024, K=64 (shape:1), a quick check.

Run from the repository root after building the benchmarks
(cmake --build --preset default --target bench_step):
    pip install -r bench/requirements-torch.txt
    python bench/torch_step.py            # target shape
    python bench/torch_step.py --small    # quick check
Options: --iters N (default 3), --threads T (default 2), --hsae-bench PATH, --no-hsae.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import numpy  # noqa: F401  (torch wants it for interop; listed in the requirements)
    import torch
except ImportError as e:
    sys.exit(f"error: {e.name} is not installed. Install the benchmark's requirements with\n"
             f"    pip install -r bench/requirements-torch.txt\n"
             f"(CPU-only wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu)")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BENCH = REPO / "build" / "default" / "bench" / "bench_step"
BIG = dict(B=4096, D=768, F=16384, K=64)
SMALL = dict(B=256, D=64, F=1024, K=64)
OPS = ("encoder GEMM", "single-K step", "all-prefix step")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_median(fn, iters: int):
    """Runs fn once to warm up, then `iters` times; returns (median seconds, results)."""
    fn()
    times, results = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), results


class TorchSAE:
    """The SAE, its Adam optimizer and one fixed batch."""

    def __init__(self, B, D, F, K, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.K = K
        self.x = torch.randn(B, D, generator=g)
        w = torch.randn(F, D, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = w.clone().requires_grad_()   # init as hsae: W_enc = W_dec, b_enc = 0
        self.W_enc = w.clone().requires_grad_()
        self.b_enc = torch.zeros(F, requires_grad=True)
        self.b_dec = self.x.mean(0).requires_grad_()  # hsae uses the geometric median
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec],
                                    lr=1e-4, eps=6.25e-10)

    def loss_single_k(self, vals, idx):
        x_hat = self.b_dec + (vals[..., None] * self.W_dec[idx]).sum(1)
        return ((self.x - x_hat) ** 2).mean()

    def loss_all_prefixes(self, vals, idx):
        c = vals[..., None] * self.W_dec[idx]                    # [B, K, D]
        x_hat = self.b_dec + torch.cumsum(c, dim=1)              # x_hat_k, k = 1..K
        return ((self.x[:, None, :] - x_hat) ** 2).mean()        # = mean_k mean((x - x_hat_k)^2)

    def step(self, loss_fn) -> float:
        self.opt.zero_grad(set_to_none=True)
        pre = torch.relu((self.x - self.b_dec) @ self.W_enc.T + self.b_enc)
        vals, idx = torch.topk(pre, self.K, dim=1, sorted=True)
        loss = loss_fn(vals, idx)
        loss.backward()
        with torch.no_grad():
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(1, keepdim=True) * w
            self.opt.step()
            w /= w.norm(dim=1, keepdim=True)
        return loss.item()

    @torch.no_grad()
    def encoder_gemm(self):
        return (self.x - self.b_dec) @ self.W_enc.T


def run_torch(shape, iters: int):
    """Returns ({op: ms}, {op: losses}) for the three operations."""
    ms, losses = {}, {}
    t, _ = time_median(TorchSAE(**shape).encoder_gemm, iters)
    ms[OPS[0]] = 1e3 * t
    for op, loss in ((OPS[1], TorchSAE.loss_single_k), (OPS[2], TorchSAE.loss_all_prefixes)):
        m = TorchSAE(**shape)  # each variant starts from the same initial model
        t, ls = time_median(lambda: m.step(lambda v, i: loss(m, v, i)), iters)
        if not all(math.isfinite(v) for v in ls):
            sys.exit(f"error: PyTorch {op} produced a non-finite loss: {ls}")
        ms[op], losses[op] = 1e3 * t, ls
    return ms, losses


def run_hsae(bench: Path, shape_id: int, threads: int):
    """Runs bench_step as a subprocess; returns {op: ms} (real time)."""
    filt = (f"(encoder_gemm|train_step<hsae::top_k<64>>|train_step<hsae::all_prefixes<64>>)"
            f"/shape:{shape_id}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([str(bench), f"--benchmark_filter={filt}", "--benchmark_format=json"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {bench} exited with {proc.returncode}:\n{proc.stderr}")
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    keys = {"encoder_gemm": OPS[0], "top_k<64>": OPS[1], "all_prefixes<64>": OPS[2]}
    ms = {}
    for b in json.loads(proc.stdout)["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration":
            continue
        for key, op in keys.items():
            if key in b["name"]:
                ms[op] = b["real_time"] * scale[b.get("time_unit", "ns")]
    missing = [op for op in OPS if op not in ms]
    if missing:
        sys.exit(f"error: {bench} reported no result for {missing}")
    return ms


def print_table(torch_ms, hsae_ms):
    rows = [("operation", "PyTorch ms", "hsae ms", "hsae speed-up (PyTorch/hsae)")]
    for op in OPS:
        h = hsae_ms.get(op) if hsae_ms else None
        rows.append((op, f"{torch_ms[op]:.1f}", "n/a" if h is None else f"{h:.1f}",
                     "n/a" if h is None else f"{torch_ms[op] / h:.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(fmt(rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows[1:]:
        print(fmt(r))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="B=256, D=64, F=1024, K=64 (quick check)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations after 1 warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="threads for PyTorch and hsae (default 2)")
    ap.add_argument("--hsae-bench", type=Path, default=DEFAULT_BENCH, help="path to hsae's bench_step")
    ap.add_argument("--no-hsae", action="store_true", help="time PyTorch only")
    args = ap.parse_args()
    if args.iters < 1 or args.threads < 1:
        ap.error("--iters and --threads must be >= 1")

    shape, shape_id = (SMALL, 1) if args.small else (BIG, 0)
    if not args.no_hsae and not args.hsae_bench.is_file():
        sys.exit(f"error: hsae benchmark binary not found at {args.hsae_bench}\n"
                 f"build it with: cmake --build --preset default --target bench_step\n"
                 f"or pass --hsae-bench PATH, or --no-hsae to time PyTorch only")
    torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"PyTorch {torch.__version__}: intra-op threads {torch.get_num_threads()}, "
          f"inter-op threads {torch.get_num_interop_threads()}")
    print(f"hsae: {'skipped' if args.no_hsae else f'{args.hsae_bench} with OMP_NUM_THREADS={args.threads}'}")
    print("shape: " + ", ".join(f"{k}={v}" for k, v in shape.items()) +
          f"; float32; median of {args.iters} after 1 warm-up (PyTorch), Google Benchmark (hsae)")

    t0 = time.perf_counter()
    torch_ms, losses = run_torch(shape, args.iters)
    t_torch = time.perf_counter() - t0
    gc.collect()  # the PyTorch model and its buffers are gone before hsae runs
    for op, ls in losses.items():
        print(f"PyTorch {op} losses: " + ", ".join(f"{v:.6g}" for v in ls))

    hsae_ms, t_hsae = None, 0.0
    if not args.no_hsae:
        t0 = time.perf_counter()
        hsae_ms = run_hsae(args.hsae_bench, shape_id, args.threads)
        t_hsae = time.perf_counter() - t0
    print()
    print_table(torch_ms, hsae_ms)
    hsae_part = "" if args.no_hsae else f", hsae part {t_hsae:.1f} s"
    print(f"\nwall time: PyTorch part {t_torch:.1f} s{hsae_part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
