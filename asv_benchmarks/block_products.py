"""How much of a kernel's time is its block products: the ceiling of any softmax work.

    python asv_benchmarks/block_products.py                   # L=2048, D=64 and 128
    python asv_benchmarks/block_products.py --length 4096 --dims 128 --repeats 7

For one head (B=1, H=1, L x L, non-causal) on one thread, this times

- the fastattn forward, and a loop of only its block products over the same blocks
  (``q k^T`` into a ``(256, 512)`` score block, then ``P v`` added into the
  accumulator), through the same BLAS ``gemm`` (:mod:`fastattn.blas`);
- the fastattn backward, and a loop of only its five block products over its
  ``(256, 256)`` blocks (``S``, ``dP``, ``dV += P^T dO``, ``dK += dS^T Q``,
  ``dQ += dS K``).

It prints each pair's times and the products' share of the kernel's time: what
the softmax passes, the score options and the bookkeeping cost together, and so how
much any work outside the products could still win. Medians of ``--repeats`` calls;
both halves run in this one process, so run it alone on the machine (``flock -x``
where the CPU is shared). Attention FLOPs: ``4 L^2 D`` forward, 2.5 times that
backward.
"""

import argparse
import time

import numpy as np
from numba import njit

FORWARD_BLOCKS = (256, 512)  # (query rows, keys) per block: the forward kernel's
BACKWARD_BLOCKS = (256, 256)  # the backward kernel's


def _product_loops():
    """``(forward_products, backward_products)``, compiled on first use (the module
    stays light to import, as asv imports every module of the suite)."""
    from fastattn.kernels.products import product, product_add, scaled_product

    @njit(error_model="numpy")
    def forward_products(gemm, alpha, query, key, value, scores, acc):
        """The forward's block products for every (query block, key block) pair."""
        block_q, block_k = scores.shape  # whole blocks: L is a multiple of both
        length = query.shape[0]
        for q_start in range(0, length, block_q):
            q_rows = query[q_start:q_start + block_q]  # (block_q, D)
            for k_start in range(0, length, block_k):
                keys = key[k_start:k_start + block_k]  # (block_k, D)
                scaled_product(gemm, alpha, q_rows, keys.T, scores)  # S (block_q, block_k)
                product_add(gemm, scores, value[k_start:k_start + block_k], acc)  # acc += P v

    @njit(error_model="numpy")
    def backward_products(gemm, query, key, value, grad_out, grad_query, grad_key,
                          grad_value, probs, grad_probs):
        """The backward's five block products for every (key block, query block) pair."""
        block_q, block_k = probs.shape  # whole blocks: L is a multiple of both
        length = query.shape[0]
        for k_start in range(0, length, block_k):
            keys, values = key[k_start:k_start + block_k], value[k_start:k_start + block_k]
            key_grads = grad_key[k_start:k_start + block_k]  # (block_k, D)
            value_grads = grad_value[k_start:k_start + block_k]  # (block_k, D)
            for q_start in range(0, length, block_q):
                q_rows = query[q_start:q_start + block_q]  # (block_q, D)
                grad_rows = grad_out[q_start:q_start + block_q]  # (block_q, D)
                product(gemm, q_rows, keys.T, probs)  # S, then P
                product(gemm, grad_rows, values.T, grad_probs)  # dP, then dS
                product_add(gemm, probs.T, grad_rows, value_grads)  # dV += P^T dO
                product_add(gemm, grad_probs.T, q_rows, key_grads)  # dK += dS^T Q
                product_add(gemm, grad_probs, keys,
                            grad_query[q_start:q_start + block_q])  # dQ += dS K

    return forward_products, backward_products


def _median_seconds(call, repeats):
    call()  # compile or load, warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(length, dim, repeats):
    """``{name: seconds}`` for the forward and backward kernels (one thread) and
    their block products alone, for one ``length x length`` head of width ``dim``."""
    import fastattn
    from fastattn import blas

    if length % FORWARD_BLOCKS[1] or length % BACKWARD_BLOCKS[1]:
        raise ValueError(f"length must be a multiple of {FORWARD_BLOCKS[1]} (whole blocks); "
                         f"got {length}")
    rng = np.random.default_rng(0)
    query, key, value, grad_out = (rng.standard_normal((length, dim), dtype=np.float32)
                                   for _ in range(4))  # (L, D) each
    gemm = blas.gemm_address(np.float32)
    alpha = np.log2(np.e) / np.sqrt(dim)
    scores = np.empty(FORWARD_BLOCKS, np.float32)  # (256, 512)
    acc = np.zeros((FORWARD_BLOCKS[0], dim), np.float32)  # (256, D)
    grads = [np.zeros((length, dim), np.float32) for _ in range(3)]  # dQ, dK, dV
    probs, grad_probs = (np.empty(BACKWARD_BLOCKS, np.float32) for _ in range(2))
    heads = [array[None, None] for array in (query, key, value, grad_out)]  # (1, 1, L, D)
    forward_products, backward_products = _product_loops()
    previous = fastattn.get_num_threads()
    fastattn.set_num_threads(1)
    try:
        out, lse = fastattn.scaled_dot_product_attention(*heads[:3], return_lse=True)
        return {
            "forward": _median_seconds(
                lambda: fastattn.scaled_dot_product_attention(*heads[:3]), repeats),
            "forward products": _median_seconds(
                lambda: forward_products(gemm, alpha, query, key, value, scores, acc),
                repeats),
            "backward": _median_seconds(
                lambda: fastattn.scaled_dot_product_attention_backward(
                    heads[3], *heads[:3], out, lse), repeats),
            "backward products": _median_seconds(
                lambda: backward_products(gemm, query, key, value, grad_out, *grads, probs,
                                           grad_probs), repeats),
        }
    finally:
        fastattn.set_num_threads(previous)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from fastattn import blas

    print(f"one thread, B=1, H=1, L={args.length}, float32, BLAS: {blas.current()['name']}, "
          f"median of {args.repeats}")
    for dim in args.dims:
        times = measure(args.length, dim, args.repeats)
        flops = 4 * args.length ** 2 * dim
        for kind, kernel_flops in (("forward", flops), ("backward", 2.5 * flops)):
            kernel, products = times[kind], times[f"{kind} products"]
            print(f"D={dim:4d} {kind:8s}: kernel {kernel * 1e3:8.2f} ms "
                  f"({kernel_flops / kernel / 1e9:6.1f} GFLOP/s), block products alone "
                  f"{products * 1e3:8.2f} ms ({kernel_flops / products / 1e9:6.1f}); "
                  f"products' share {products / kernel:.2f}")


if __name__ == "__main__":
    main()
