"""What a call means: its options, the validated problem and the checks behind it (private).

Imports NumPy only; shared by the kernels' front ends and :mod:`reference`."""
