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
"""

from fastattn.kernels.vector_math import exp, exp2, tanh

__all__ = ["exp", "exp2", "tanh"]
