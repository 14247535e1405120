"""Numba-compiled kernels. Private: the public functions in :mod:`fastattn` validate
and lay out the inputs, then call these."""
