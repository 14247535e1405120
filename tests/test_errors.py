"""Every bad argument of the contract raises ValueError or TypeError naming it,
the same way in fastattn and in the reference."""

import numpy as np
import pytest

Q = np.zeros((2, 3, 5, 4))  # (B, H, Lq, Dk)
K = np.zeros((2, 3, 6, 4))  # (B, H, Lk, Dk)
V = np.zeros((2, 3, 6, 7))  # (B, H, Lk, Dv)


BAD_CALLS = [
    # (id, arguments, keyword arguments, exception, words the message must hold)
    ("query-1d", (np.zeros(4), K, V), {}, ValueError, ["query", "(4,)"]),
    ("dk-mismatch", (Q, np.zeros((2, 3, 6, 5)), V), {}, ValueError, ["Dk", "(2, 3, 5, 4)", "(2, 3, 6, 5)"]),
    ("lk-mismatch", (Q, K, np.zeros((2, 3, 8, 7))), {}, ValueError, ["Lk", "key", "value", "(2, 3, 8, 7)"]),
    ("batch", (Q, np.zeros((4, 3, 6, 4)), V), {}, ValueError, ["batch", "query (2, 3)", "key (4, 3)"]),
    ("mask-dtype", (Q, K, V, np.zeros((5, 6))), {}, TypeError, ["mask", "bias="]),
    ("mask-shape", (Q, K, V, np.ones((5, 5), bool)), {}, ValueError, ["mask", "(5, 5)", "Lk=6"]),
    ("mask-batch", (Q, K, V, np.ones((4, 1, 5, 6), bool)), {}, ValueError, ["batch", "mask (4, 1)"]),
    ("bias-shape", (Q, K, V), {"bias": np.zeros((3, 6))}, ValueError, ["bias", "(3, 6)", "Lq=5"]),
    ("bias-batch", (Q, K, V), {"bias": np.zeros((7, 5, 6))}, ValueError, ["batch", "bias (7,)"]),
    ("bias-dtype", (Q, K, V), {"bias": np.zeros((5, 6), complex)}, TypeError, ["bias"]),
    ("bias-plus-inf", (Q, K, V), {"bias": np.full((5, 6), np.inf)}, ValueError, ["bias", "+inf"]),
    ("gqa-divisible", (Q, np.zeros((2, 2, 6, 4)), np.zeros((2, 2, 6, 7))), {"enable_gqa": True},
     ValueError, ["Hq=3", "Hkv=2"]),
    ("gqa-kv-heads", (np.zeros((2, 4, 5, 4)), np.zeros((2, 2, 6, 4)), np.zeros((2, 1, 6, 7))),
     {"enable_gqa": True}, ValueError, ["key", "value", "heads"]),
    ("gqa-no-heads", (np.zeros((5, 4)), np.zeros((6, 4)), np.zeros((6, 7))), {"enable_gqa": True},
     ValueError, ["enable_gqa", "head axis"]),
    ("gqa-off", (np.zeros((2, 4, 5, 4)), np.zeros((2, 2, 6, 4)), np.zeros((2, 2, 6, 7))), {},
     ValueError, ["batch", "query (2, 4)", "key (2, 2)"]),
    ("window-negative", (Q, K, V), {"window": (-1, 2)}, ValueError, ["window", "non-negative"]),
    ("window-shape", (Q, K, V), {"window": 3}, ValueError, ["window", "pair"]),
    ("window-float", (Q, K, V), {"window": (1.5, 2)}, TypeError, ["window"]),
    ("kv-lengths-length", (Q, K, V), {"kv_lengths": [1, 2, 3]}, ValueError, ["kv_lengths", "(2,)", "(3,)"]),
    ("kv-lengths-range", (Q, K, V), {"kv_lengths": [1, 7]}, ValueError, ["kv_lengths", "[0, 6]"]),
    ("kv-lengths-negative", (Q, K, V), {"kv_lengths": [-1, 2]}, ValueError, ["kv_lengths"]),
    ("kv-lengths-dtype", (Q, K, V), {"kv_lengths": [1.0, 2.0]}, TypeError, ["kv_lengths"]),
    ("kv-lengths-unbatched", (Q[0, 0], K[0, 0], V[0, 0]), {"kv_lengths": [1, 2]}, ValueError,
     ["kv_lengths", "(1,)"]),
    ("scale-nan", (Q, K, V), {"scale": float("nan")}, ValueError, ["scale", "finite"]),
    ("scale-inf", (Q, K, V), {"scale": np.inf}, ValueError, ["scale", "finite"]),
    ("scale-type", (Q, K, V), {"scale": "0.5"}, TypeError, ["scale"]),
    ("alignment", (Q, K, V), {"causal": True, "causal_alignment": "bottom-right"}, ValueError,
     ["causal_alignment", "bottom-right"]),
]


@pytest.mark.parametrize("args, kwargs, error, words", [case[1:] for case in BAD_CALLS],
                         ids=[case[0] for case in BAD_CALLS])
def test_bad_arguments(attention, args, kwargs, error, words):
    with pytest.raises(error) as raised:
        attention(*args, **kwargs)
    for word in words:
        assert word in str(raised.value), f"{word!r} missing from: {raised.value}"


def test_both_paths_give_the_same_message():
    import fastattn
    import reference

    messages = []
    for function in (fastattn.scaled_dot_product_attention, reference.scaled_dot_product_attention):
        with pytest.raises(ValueError) as raised:
            function(Q, K, np.zeros((2, 3, 8, 7)))
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
