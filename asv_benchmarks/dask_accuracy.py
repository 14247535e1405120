"""Largest errors of fastattn.dask on a LocalCluster (2 workers x 1 thread) against the
float64 reference, forward (out, lse) and backward, float32 and float64, over the
options (plain, causal in both alignments, window, kv_lengths with an empty row,
a Dask mask with a NumPy bias, GQA); B=2, Lq=600, Lk=1000, D=64 in chunks of 256 x 300.

    python asv_benchmarks/dask_accuracy.py

The contract's tolerances are float32 2e-5 and float64 1e-10 (gradients relative to
their largest entry); tests/test_dask.py asserts them on smaller problems. Dask is
imported inside ``main`` so that asv's discovery of this folder needs no Dask.
"""

import warnings

import numpy as np

CASES = [
    ("plain", {}),
    ("causal top_left", {"causal": True}),
    ("causal bottom_right", {"causal": True, "causal_alignment": "bottom_right"}),
    ("window (64, 16)", {"window": (64, 16)}),
    ("kv_lengths", {"kv_lengths": np.array([700, 0])}),
    ("mask and bias", {}),
    ("gqa", {"enable_gqa": True, "causal": True}),
]


def case_errors(client, rng, name, options, dtype):
    """Largest errors of one case: out (absolute), lse (relative), gradients
    (relative to the largest entry)."""
    import dask.array as da

    import fastattn.dask
    import reference

    q_heads = 4 if name == "gqa" else 2
    query = rng.standard_normal((2, q_heads, 600, 64)).astype(dtype)  # (B, Hq, Lq, D)
    key = rng.standard_normal((2, 2, 1000, 64)).astype(dtype)  # (B, Hkv, Lk, D)
    value = rng.standard_normal((2, 2, 1000, 64)).astype(dtype)  # (B, Hkv, Lk, D)
    mask = lazy_mask = None
    if name == "mask and bias":
        mask = rng.random((2, 1, 600, 1000)) < 0.8  # (B, 1, Lq, Lk)
        lazy_mask = da.from_array(mask, chunks=(1, 1, 256, 300))
        options = dict(options, bias=rng.standard_normal((600, 1000)))
    lazy = [da.from_array(query, chunks=(1, q_heads, 256, 64)),
            da.from_array(key, chunks=(1, 2, 300, 64)),
            da.from_array(value, chunks=(1, 2, 300, 64))]
    out, lse = fastattn.dask.scaled_dot_product_attention(*lazy, lazy_mask, return_lse=True,
                                                          **options)
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.dask.scaled_dot_product_attention_backward(grad_out, *lazy, out, lse,
                                                                lazy_mask, **options)
    got_out, got_lse, *got_grads = client.compute([out, lse, *grads], sync=True)

    as64 = [array.astype(np.float64) for array in (query, key, value)]
    want_out, want_lse = reference.scaled_dot_product_attention(*as64, mask, return_lse=True,
                                                                **options)
    want_grads = reference.scaled_dot_product_attention_backward(
        grad_out.astype(np.float64), *as64, want_out, want_lse, mask, **options)
    seen = np.isfinite(want_lse)
    assert (np.isneginf(got_lse) == ~seen).all(), name
    lse_error = np.abs(got_lse[seen] - want_lse[seen]) / np.maximum(1, np.abs(want_lse[seen]))
    grad_error = max(float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
                     for got, want in zip(got_grads, want_grads))
    return float(np.abs(got_out - want_out).max()), float(lse_error.max()), grad_error


def main():
    import distributed

    warnings.filterwarnings("ignore", "Sending large graph")  # inputs made on the client
    rng = np.random.default_rng(1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        for dtype in (np.float32, np.float64):
            errors = [case_errors(client, rng, name, options, dtype) for name, options in CASES]
            worst = np.max(errors, axis=0)
            print(f"{np.dtype(dtype).name}: out {worst[0]:.2e}, lse {worst[1]:.2e}, "
                  f"gradients {worst[2]:.2e} (worst of {len(CASES)} cases)", flush=True)


if __name__ == "__main__":
    main()
