"""The reference checked against the worked examples in the user's notes (../shared/seeds/).

Scores are read back through the public API: with ``scale=1`` the weights are
``softmax(S)`` and ``log(weights) + lse`` recovers ``S`` row by row.
"""

import numpy as np
import pytest

import reference
from fastattn.demo.examples import MONEY_RIVER_EMBEDDINGS, THE_CAT_SAT_EMBEDDINGS


def scores_through_api(query, key, scale=1.0, **options):
    """``S = scale * query @ key^T`` recovered from the reference's weights and lse."""
    value = np.zeros((key.shape[0], 1))
    _, weights, lse = reference.scaled_dot_product_attention(
        query, key, value, scale=scale, return_weights=True, return_lse=True, **options)
    with np.errstate(divide="ignore"):
        return np.log(weights) + lse[:, None]  # (Lq, Lk)


def test_money_bank_river_score_matrix():
    """002: S = E E^T for Money, Bank, Grows, River, Flows, each entry worked by hand.

    The notes' printed matrix has slips in the River/Flows cross terms (it prints
    0.20 for Money.River = 0.02+0.02+0.12 = 0.16, 0.26 for River.Flows = 0.10+0.03+0.08
    = 0.21); these are the products of the notes' embeddings.
    """
    expected = np.array([
        [0.14, 0.32, 0.50, 0.16, 0.17],
        [0.32, 0.77, 1.22, 0.37, 0.47],
        [0.50, 1.22, 1.94, 0.58, 0.77],
        [0.16, 0.37, 0.58, 0.21, 0.21],
        [0.17, 0.47, 0.77, 0.21, 0.38],
    ])
    embeddings = MONEY_RIVER_EMBEDDINGS  # (5, 3)
    np.testing.assert_allclose(scores_through_api(embeddings, embeddings), expected, atol=1e-12)


def test_the_cat_sat_scores_with_identity_projections():
    """001: Q = K = V = E with W_q = W_k = W_v = I; SAT attends most to itself."""
    embeddings = THE_CAT_SAT_EMBEDDINGS  # (3, 4) THE, CAT, SAT
    expected = np.array([[2.0, 0.0, 2.0], [0.0, 2.0, 2.0], [2.0, 2.0, 4.0]])
    np.testing.assert_allclose(scores_through_api(embeddings, embeddings), expected, atol=1e-12)
    # default scale 1/sqrt(d_k) = 1/2 halves every score
    np.testing.assert_allclose(scores_through_api(embeddings, embeddings, scale=None),
                               expected / 2, atol=1e-12)


def test_softmax_of_six_and_four():
    """001: softmax([6, 4]) = [0.88, 0.12]; most weight goes to the larger score."""
    weights, lse = reference.masked_softmax(np.array([[6.0, 4.0]]))
    np.testing.assert_allclose(weights[0], [0.88, 0.12], atol=1e-3)
    np.testing.assert_allclose(weights[0], [1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2))])
    np.testing.assert_allclose(lse, [6 + np.log1p(np.exp(-2))])


def test_decoder_mask_example():
    """004: L = 5, d_k = 6, d_v = 4 with a causal mask.

    Row 0 attends only to itself (so its new embedding is V[0]), nothing attends to a
    later word, and every row of weights sums to 1 (the notes' softmax summed over the
    wrong axis, which is why their rows did not).
    """
    rng = np.random.default_rng(4)
    query = rng.standard_normal((5, 6))  # (L, d_k)
    key = rng.standard_normal((5, 6))  # (L, d_k)
    value = rng.standard_normal((5, 4))  # (L, d_v)
    out, weights = reference.scaled_dot_product_attention(query, key, value, causal=True,
                                                          return_weights=True)
    assert out.shape == (5, 4) and weights.shape == (5, 5)
    np.testing.assert_allclose(weights[0], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(out[0], value[0])
    assert (weights[np.triu_indices(5, k=1)] == 0).all()
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0)
    # the same through an explicit lower-triangular boolean mask
    explicit = reference.scaled_dot_product_attention(query, key, value, np.tril(np.ones((5, 5), bool)))
    np.testing.assert_allclose(out, explicit)


@pytest.mark.parametrize("head_dim", [3, 100, 1000])
def test_scaling_by_sqrt_dk_restores_unit_variance(head_dim):
    """000/004: var(q.k) grows like d_k; dividing by sqrt(d_k) brings it back to 1."""
    rng = np.random.default_rng(head_dim)
    query = rng.standard_normal((400, head_dim))  # (L, d_k)
    key = rng.standard_normal((400, head_dim))  # (L, d_k)
    raw = scores_through_api(query, key, scale=1.0)  # (L, L)
    scaled = scores_through_api(query, key, scale=None)  # (L, L)
    assert raw.var() == pytest.approx(head_dim, rel=0.1)
    assert scaled.var() == pytest.approx(1.0, rel=0.1)


def test_unscaled_softmax_saturates_at_large_dk():
    """000: without scaling, large d_k puts nearly all weight on one key per row."""
    rng = np.random.default_rng(1000)
    query, key = rng.standard_normal((2, 50, 1000))  # (L, d_k) each
    value = np.zeros((50, 1))

    def mean_top_weight(scale):
        _, weights = reference.scaled_dot_product_attention(query, key, value, scale=scale,
                                                            return_weights=True)
        return weights.max(axis=-1).mean()

    assert mean_top_weight(1.0) > 0.9
    assert mean_top_weight(None) < 0.5
