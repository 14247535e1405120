"""Checks of the arguments of attention, shared by every implementation.

:mod:`fastattn.checks.arguments` checks dtypes and the scalar arguments (scale,
window, causal alignment, ``kv_lengths``); :mod:`fastattn.checks.shapes` checks
shapes, batch broadcasting and grouped-query heads. :mod:`fastattn.problem`
combines them into an :class:`~fastattn.problem.AttentionProblem`.

This package imports NumPy only, never Numba.
"""
