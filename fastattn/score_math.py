"""Math for user score functions that vectorises inside the kernels' block loops.

``math.tanh`` and ``math.exp`` in a Numba function are calls into the C library, one
per score (about 14 ns for ``tanh`` here), which keep the loop over a score block
scalar. These are built from multiply-adds and a bit cast
(:mod:`fastattn.kernels.vector_math`), so the loop around a ``score_mod`` that uses
them runs in SIMD registers (about 1 ns per score); they agree with ``math`` within
a few float32 rounding steps (``1e-15`` relative in float64). Called from plain
Python (as the reference does), they are ``math``'s functions.

    from fastattn.score_math import tanh

    @numba.njit
    def softcap(s, b, h, i, j):
        return 30.0 * tanh(s / 30.0)

Examples
--------
A soft cap written as a ``score_mod`` with :func:`tanh` gives the built-in
``softcap``'s result:

>>> import numba, numpy as np, fastattn
>>> from fastattn.score_math import exp, exp2, tanh
>>> @numba.njit
... def capped(s, b, h, i, j):
...     return 30.0 * tanh(s / 30.0)
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((1, 2, 64, 16)) for _ in range(3))
>>> by_function = fastattn.scaled_dot_product_attention(q, k, v, score_mod=capped)
>>> built_in = fastattn.scaled_dot_product_attention(q, k, v, softcap=30.0)
>>> bool(np.allclose(by_function, built_in))
True

From plain Python they are :mod:`math`'s functions:

>>> float(tanh(0.5)) == float(np.tanh(0.5)), float(exp2(3.0))
(True, 8.0)
"""

from fastattn.kernels.vector_math import exp, exp2, tanh

__all__ = ["exp", "exp2", "tanh"]
