"""Largest errors of fastattn.dask on a LocalCluster (2 workers x 1 thread) against the
float64 reference, forward (out, lse) and backward, float32 and float64, over the
options (plain, causal in both alignments, window, kv_lengths with an empty row,
Dask mask + NumPy bias, GQA); B=2, Lq=600, Lk=1000, D=64 in chunks of 256 x 300.

    python asv_benchmarks/dask_accuracy.py

The contract's tolerances are float32 2e-5, float64 1e-10 (gradients relative to
their largest entry); tests/test_dask.py asserts them on smaller problems.
"""
import warnings
import numpy as np, dask.array as da, distributed, fastattn.dask as fd, reference
rng = np.random.default_rng(1)
cases = [
    ("plain", {}), ("causal top_left", {"causal": True}),
    ("causal bottom_right", {"causal": True, "causal_alignment": "bottom_right"}),
    ("window (64, 16)", {"window": (64, 16)}),
    ("kv_lengths", {"kv_lengths": np.array([700, 0])}),
    ("mask + bias", "mask"), ("gqa", {"enable_gqa": True, "causal": True}),
]
if __name__ == "__main__":
    warnings.filterwarnings("ignore", "Sending large graph")  # inputs made on the client
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        for dtype in (np.float32, np.float64):
            worst = {"out": 0.0, "lse": 0.0, "grads (rel. to max)": 0.0}
            for name, options in cases:
                qh = 4 if name == "gqa" else 2
                q = rng.standard_normal((2, qh, 600, 64)).astype(dtype)
                k = rng.standard_normal((2, 2, 1000, 64)).astype(dtype)
                v = rng.standard_normal((2, 2, 1000, 64)).astype(dtype)
                if options == "mask":
                    mask = rng.random((2, 1, 600, 1000)) < 0.8
                    bias = rng.standard_normal((600, 1000))
                    options = {"bias": bias}
                    lmask, dmask = mask, da.from_array(mask, chunks=(1, 1, 256, 300))
                else:
                    lmask = dmask = None
                dq = da.from_array(q, chunks=(1, qh, 256, 64)); dk = da.from_array(k, chunks=(1, 2, 300, 64)); dv = da.from_array(v, chunks=(1, 2, 300, 64))
                out, lse = fd.scaled_dot_product_attention(dq, dk, dv, dmask, return_lse=True, **options)
                g = rng.standard_normal(out.shape).astype(dtype)
                grads = fd.scaled_dot_product_attention_backward(g, dq, dk, dv, out, lse, dmask, **options)
                got = client.compute([out, lse, *grads], sync=True)
                as64 = [a.astype(np.float64) for a in (q, k, v)]
                ro, rl = reference.scaled_dot_product_attention(*as64, lmask, return_lse=True, **options)
                rg = reference.scaled_dot_product_attention_backward(g.astype(np.float64), *as64, ro, rl, lmask, **options)
                worst["out"] = max(worst["out"], float(np.abs(got[0] - ro).max()))
                fin = np.isfinite(rl)
                assert (np.isneginf(got[1]) == ~fin).all()
                worst["lse"] = max(worst["lse"], float((np.abs(got[1][fin] - rl[fin]) / np.maximum(1, np.abs(rl[fin]))).max()))
                for a, b in zip(got[2:], rg):
                    worst["grads (rel. to max)"] = max(worst["grads (rel. to max)"], float(np.abs(a - b).max() / max(1, np.abs(b).max())))
            print(np.dtype(dtype).name, {k: f"{v:.2e}" for k, v in worst.items()}, f"over {len(cases)} cases, B=2, Lq=600, Lk=1000, D=64, chunks 256 x 300")
