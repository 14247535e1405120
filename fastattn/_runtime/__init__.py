"""What fastattn runs with: BLAS routes, threads and the process settings (private)."""
