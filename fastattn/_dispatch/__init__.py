"""From a validated problem to the kernels and back: layout, tiling, running (private)."""
