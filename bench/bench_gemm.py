"""The machine's matrix products: torch's (MKL) sgemm against oneDNN's, per T5 product shape, fp32 on a CPU.

    OMP_NUM_THREADS=2 python bench/bench_gemm.py [--threads 2]

Prints the square-product rate of both (512, 1024, 2048) and, for each T5 v1.1 shape of bench.RANDOM_CONFIGS
(tiny, the reference student; small; base) at 256, 1024 and 2048 rows, the milliseconds of each product of
speedups.PRODUCTS (a linear layer's forward, input gradient and weight gradient, and the fused head's weight gradient,
on oneDNN by blocks) on each library: the best of 5 calls after 2 (2 calls for the largest). This is what
speedups.onednn_faster decides from, shape by shape, on the machine a run trains on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import RANDOM_CONFIGS  # noqa: E402 - a sibling developer tool
from speedups import PRODUCTS, best_time, onednn_mm_t  # noqa: E402 - the project's own calls

VOCABULARY = 32128
WARMUPS = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; square products, GFLOP/s:")
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        mkl = best_time(lambda: a @ b.T, 5, WARMUPS)
        onednn = best_time(lambda: onednn_mm_t(a, b), 5, WARMUPS)
        print(f"  {n}: MKL {2 * n**3 / mkl / 1e9:.1f}, oneDNN {2 * n**3 / onednn / 1e9:.1f}")
    print("| shape | rows | in | out | " + " | ".join(f"{p} MKL · oneDNN ms" for p in PRODUCTS) + " | MKL / oneDNN, all products |")
    print("|---|---|---|---|" + "---|" * (len(PRODUCTS) + 1))
    for name, shape in RANDOM_CONFIGS.items():
        d_model, d_ff, inner = shape["d_model"], shape["d_ff"], shape["num_heads"] * shape["d_kv"]
        for rows in (256, 1024, 2048):
            for k, n in ((d_model, inner), (d_model, d_ff), (d_ff, d_model), (d_model, VOCABULARY)):
                x, weight, grad = torch.randn(rows, k), torch.randn(n, k), torch.randn(rows, n)
                repeats = 5 if rows * k * n < 2e9 else 2
                times = []
                for product in PRODUCTS.values():
                    onednn, mkl = product(x, weight, grad)
                    times.append((best_time(mkl, repeats, WARMUPS), best_time(onednn, repeats, WARMUPS)))
                cells = " | ".join(f"{m * 1e3:.2f} · {o * 1e3:.2f}" for m, o in times)
                ratio = sum(m for m, _ in times) / sum(o for _, o in times)
                print(f"| {name} | {rows} | {k} | {n} | {cells} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
