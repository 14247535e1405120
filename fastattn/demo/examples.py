"""The worked examples of the user's lecture notes (``shared/seeds``), as data.

Shared by the console demo (:mod:`fastattn.demo.console`), its figures
(:mod:`fastattn.demo.plots`), the tests and the documentation's gallery.
"""

import numpy as np

# 002: 3-d word embeddings of "Money Bank Grows" and "River Bank Flows" (rows).
MONEY_RIVER_WORDS = ("Money", "Bank", "Grows", "River", "Flows")
MONEY_RIVER_EMBEDDINGS = np.array([
    [0.1, 0.2, 0.3],  # Money
    [0.4, 0.5, 0.6],  # Bank
    [0.7, 0.8, 0.9],  # Grows
    [0.2, 0.1, 0.4],  # River
    [0.5, 0.3, 0.2],  # Flows
])
SENTENCES = {
    "Money Bank Grows": [0, 1, 2],
    "River Bank Flows": [3, 1, 4],
}

# 001: THE, CAT, SAT with identity projections W_q = W_k = W_v = I.
THE_CAT_SAT_WORDS = ("THE", "CAT", "SAT")
THE_CAT_SAT_EMBEDDINGS = np.array([
    [1.0, 0.0, 1.0, 0.0],  # THE
    [0.0, 1.0, 0.0, 1.0],  # CAT
    [1.0, 1.0, 1.0, 1.0],  # SAT
])
