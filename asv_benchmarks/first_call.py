"""First-call cost in a fresh interpreter: importing fastattn and finishing one call.

``timeraw_*`` benchmarks return code that asv times in a new Python process.
``warm_cache`` loads the kernels compiled by an earlier run from Numba's on-disk
cache (the setup makes sure that cache exists); ``cold_compile`` points
``NUMBA_CACHE_DIR`` (which Numba consults first) at an empty folder, so every
kernel the call needs is compiled from scratch.
"""

import subprocess
import sys

_FIRST_CALL = """
import numpy as np
import fastattn
query = np.ones((1, 1, 4, 8), np.{dtype})
fastattn.scaled_dot_product_attention(query, query, query)
"""

_COLD_PREFIX = """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastattn-cold-")
"""


class TimerawFirstCall:
    """Import + first float32 or float64 call, from the on-disk cache or compiled cold."""

    params = [["warm_cache", "cold_compile"], ["float32", "float64"]]
    param_names = ["cache", "dtype"]
    number = 1
    repeat = (1, 3, 120.0)
    timeout = 300

    def setup(self, cache, dtype):
        # fill the on-disk cache for the warm case (no-op when it is already there)
        subprocess.run([sys.executable, "-c", _FIRST_CALL.format(dtype=dtype)], check=True)

    def timeraw_import_and_first_call(self, cache, dtype):
        code = _FIRST_CALL.format(dtype=dtype)
        return _COLD_PREFIX + code if cache == "cold_compile" else code
