"""Block masks made for a broadcast batch shape, the mask combinations
(``and_masks``, ``or_masks``, ``noop_mask``), and the larger call's positions that
``chunk_of`` shows the user functions (issue 22, parts 4 and 5; part 6's local
half). fastattn against the reference on awkward lengths, forward and backward;
broadcast masks against the per-entry masks they stand for; combinations against
the same functions written by hand; the errors."""

import numba
import numpy as np
import pytest
from conftest import (FASTATTN, IMPLEMENTATIONS, REFERENCE, assert_close_to_reference,
                      assert_gradients_match_reference, forward_and_backward, forward_options,
                      random_inputs)
from user_functions import documents, prefix_lm, same_document, wobble, wobble_grad

import fastattn
import reference


@numba.njit
def own_entry(b, h, i, j, document_of):
    """Causal within documents (``document_of`` ``(B', L)``, indexed by the mask's
    own ``b``), every third key hidden for the mask's own head ``h``."""
    return document_of[b, i] == document_of[b, j] and j <= i and (j + h) % 3 != 0


@numba.njit
def head_window(b, h, i, j, widths):
    """A window of ``widths[h]`` keys."""
    return i - widths[h] <= j <= i + widths[h]


@numba.njit
def causal(b, h, i, j):
    return j <= i


@numba.njit
def hides_own_entry(b, h, i, j):
    """Hides key ``b + 2 h``: shows which ``(b, h)`` the function was given."""
    return j != b + 2 * h


def document_of(rng, rows, length):
    """Sorted document ids ``(rows, L)`` of about four documents per row."""
    return np.sort(rng.integers(0, 4, (rows, length)), axis=1)


# ---------------------------------------------------------------- broadcast block masks

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_batch", [(1, 1), (2, 1), (1, 3), (3,), (1,), ()])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (31, 33), (33, 31), (70, 129)])
def test_broadcast_block_mask_matches_the_reference(rng, mask_batch, q_len, kv_len, dtype):
    """Forward and backward with a block mask of a broadcast batch shape, tiles of
    32: ``mask_mod`` sees the mask's own ``(b, h)``."""
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, kv_len, 8), 4, dtype)
    rows = mask_batch[0] if len(mask_batch) == 2 else 1
    ids = document_of(rng, max(rows, 3), max(q_len, kv_len))
    block_mask = fastattn.create_block_mask(own_entry, mask_batch, q_len, kv_len,
                                            block_size=32, mask_mod_args=(ids,))
    assert block_mask.states.shape[0] == int(np.prod(mask_batch))  # stored once
    assert_close_to_reference(query, key, value, return_lse=True, block_mask=block_mask,
                              score_mod=wobble)
    assert_gradients_match_reference(rng, query, key, value, block_mask=block_mask,
                                     score_mod=wobble, score_mod_grad=wobble_grad)


@pytest.mark.parametrize("mask_batch, function", [((1, 1), documents), ((1, 3), head_window)])
def test_broadcast_block_mask_equals_the_per_entry_mask(rng, mask_batch, function):
    """A mask that does not depend on the axes it broadcasts along gives, bitwise,
    what the mask made for every entry gives."""
    query, key, value = random_inputs(rng, (2, 3, 150, 16), (2, 3, 140, 16))
    args = (np.array([3, 40, 100]),) if function is head_window else ()
    grad_out = rng.standard_normal((2, 3, 150, 16))
    results = []
    for batch in (mask_batch, (2, 3)):
        block_mask = fastattn.create_block_mask(function, batch, 150, 140, block_size=32,
                                                mask_mod_args=args)
        results.append(forward_and_backward(FASTATTN, query, key, value, None, grad_out,
                                            block_mask=block_mask))
    for broadcast, per_entry in zip(*results):
        np.testing.assert_array_equal(broadcast, per_entry)


def test_broadcast_mask_mod_sees_the_masks_own_entry(rng, attention):
    """A ``(1, 1)`` mask's ``mask_mod`` is called with ``b = h = 0`` for every entry."""
    query, key, value = random_inputs(rng, (2, 3, 9, 8), (2, 3, 9, 8))
    block_mask = fastattn.create_block_mask(hides_own_entry, (1, 1), 9, 9, block_size=4)
    dense = np.arange(9) != 0  # (Lk,): key 0 hidden everywhere
    np.testing.assert_allclose(attention(query, key, value, block_mask=block_mask),
                               attention(query, key, value, dense), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("made_for", [(2, 2), (2,), (3, 3), (1, 2, 3), (4, 1)])
def test_block_mask_that_does_not_broadcast(attention, made_for):
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    block_mask = fastattn.create_block_mask(prefix_lm, made_for, 4, 5)
    with pytest.raises(ValueError) as raised:
        attention(query, key, value, block_mask=block_mask)
    for word in ("block_mask", str(made_for), "(2, 3)", "broadcast"):
        assert word in str(raised.value)


def test_broadcast_block_mask_with_torch(rng):
    """fastattn.torch with a ``(1, 1)`` block mask: gradients by autograd's check."""
    torch = pytest.importorskip("torch")
    import fastattn.torch as fastattn_torch

    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(shape, generator=generator, dtype=torch.float64,
                                     requires_grad=True)
                         for shape in ((2, 2, 5, 4), (2, 2, 9, 4), (2, 2, 9, 4)))
    ids = document_of(rng, 1, 9)
    block_mask = fastattn.create_block_mask(own_entry, (1, 1), 5, 9, block_size=4,
                                            mask_mod_args=(ids,))

    def attention(query, key, value):
        return fastattn_torch.scaled_dot_product_attention(query, key, value,
                                                           block_mask=block_mask)

    want = reference.scaled_dot_product_attention(*(t.detach().numpy() for t in
                                                    (query, key, value)), block_mask=block_mask)
    np.testing.assert_allclose(attention(query, key, value).detach().numpy(), want,
                               rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(attention, (query, key, value))


# ---------------------------------------------------------------- and_masks, or_masks

@numba.njit
def causal_documents_by_hand(b, h, i, j, document_of, widths):
    return ((j <= i) & (document_of[b, i] == document_of[b, j])
            & (i - widths[h] <= j <= i + widths[h]))


@numba.njit
def documents_or_window_by_hand(b, h, i, j, document_of, widths):
    return (document_of[b, i] == document_of[b, j]) | (i - widths[h] <= j <= i + widths[h])


@numba.njit
def same_row_document(b, h, i, j, document_of):
    return document_of[b, i] == document_of[b, j]


@numba.njit
def three_arguments(b, h, i):
    return True


COMBINATIONS = {
    "and": (lambda: fastattn.and_masks(causal, same_row_document, head_window),
            causal_documents_by_hand),
    "or": (lambda: fastattn.or_masks(same_row_document, head_window),
           documents_or_window_by_hand),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (63, 65), (65, 63)])
def test_combination_matches_the_reference(rng, name, dtype, q_len, kv_len):
    """A combination as ``mask_mod`` and in a block mask, against the reference;
    its ``mask_mod_args`` are its components' in order."""
    combine, _ = COMBINATIONS[name]
    query, key, value = random_inputs(rng, (2, 3, q_len, 8), (2, 3, kv_len, 8), 8, dtype)
    args = (document_of(rng, 2, max(q_len, kv_len)), np.array([2, 9, 30]))
    mask_mod = combine()
    assert_close_to_reference(query, key, value, return_lse=True, mask_mod=mask_mod,
                              mask_mod_args=args)
    block_mask = fastattn.create_block_mask(mask_mod, (2, 3), q_len, kv_len, block_size=16,
                                            mask_mod_args=args)
    assert_close_to_reference(query, key, value, return_lse=True, block_mask=block_mask)
    assert_gradients_match_reference(rng, query, key, value, block_mask=block_mask)


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combination_equals_the_function_by_hand(rng, name):
    """The same tiles and, bitwise, the same results as the function written out."""
    combine, by_hand = COMBINATIONS[name]
    query, key, value = random_inputs(rng, (2, 3, 90, 8), (2, 3, 90, 8))
    args = (document_of(rng, 2, 90), np.array([2, 9, 30]))
    results = []
    for mask_mod in (combine(), by_hand):
        block_mask = fastattn.create_block_mask(mask_mod, (2, 3), 90, 90, block_size=32,
                                                mask_mod_args=args)
        results.append((block_mask.states,
                        fastattn.scaled_dot_product_attention(query, key, value,
                                                              block_mask=block_mask),
                        fastattn.scaled_dot_product_attention(query, key, value,
                                                              mask_mod=mask_mod,
                                                              mask_mod_args=args)))
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


def test_noop_mask_and_empty_combinations(rng, attention):
    query, key, value = random_inputs(rng, (2, 3, 20, 8), (2, 3, 30, 8))
    plain = attention(query, key, value)
    for mask_mod in (fastattn.noop_mask, fastattn.and_masks(),
                     fastattn.and_masks(fastattn.noop_mask, fastattn.noop_mask)):
        np.testing.assert_allclose(attention(query, key, value, mask_mod=mask_mod), plain,
                                   rtol=1e-12, atol=1e-12)
    nothing = attention(query, key, value, mask_mod=fastattn.or_masks(), return_lse=True)
    assert (nothing[0] == 0).all() and (nothing[1] == -np.inf).all()
    assert fastattn.or_masks(causal, fastattn.noop_mask)(0, 0, 1, 5)
    assert not fastattn.and_masks(causal, fastattn.noop_mask)(0, 0, 1, 5)


def test_nested_combinations(rng):
    """A combination of combinations takes the arguments of all, in order."""
    query, key, value = random_inputs(rng, (2, 3, 40, 8), (2, 3, 40, 8))
    ids, widths = document_of(rng, 2, 40), np.array([1, 4, 9])
    nested = fastattn.or_masks(fastattn.and_masks(causal, same_row_document), head_window)
    assert_close_to_reference(query, key, value, mask_mod=nested, mask_mod_args=(ids, widths))


@pytest.mark.parametrize("combine", [fastattn.and_masks, fastattn.or_masks])
def test_combination_errors(combine):
    with pytest.raises(TypeError, match=r"argument 1 must be a Numba-compiled mask function"):
        combine(causal, lambda b, h, i, j: True)
    with pytest.raises(TypeError, match=r"argument 0 \(three_arguments\) takes 3"):
        combine(three_arguments, causal)


def test_combination_checks_its_arguments(rng, attention):
    """Too few arrays for the components: the arity error names mask_mod."""
    query, key, value = random_inputs(rng, (2, 3, 8, 8), (2, 3, 8, 8))
    combined = fastattn.and_masks(causal, same_document)
    with pytest.raises(TypeError, match="mask_mod"):
        attention(query, key, value, mask_mod=combined)
    out = attention(query, key, value, mask_mod=combined, mask_mod_args=(np.zeros(8, int),))
    np.testing.assert_allclose(out, attention(query, key, value, causal=True), rtol=1e-12,
                               atol=1e-12)


# ---------------------------------------------------------------- chunk_of

@pytest.mark.parametrize("mask_batch", [None, (1, 1), (2, 1), ()])
def test_chunk_sees_the_larger_calls_positions(rng, mask_batch):
    """A batch block and rows of a call, computed alone with ``chunk_of``, equal the
    same block of the whole call: the user functions see the whole call's ``(b, h,
    i, j)`` (``mask_mod`` the mask's own ``(b, h)``)."""
    query, key, value = random_inputs(rng, (2, 3, 50, 8), (2, 3, 60, 8))
    ids = document_of(rng, 2, 60)
    grad_out = rng.standard_normal((2, 3, 50, 8))
    whole_options = dict(score_mod=wobble, score_mod_grad=wobble_grad)
    if mask_batch is None:
        whole_options.update(mask_mod=own_entry, mask_mod_args=(ids,))
    else:
        whole_options.update(block_mask=fastattn.create_block_mask(
            own_entry, mask_batch, 50, 60, block_size=16, mask_mod_args=(ids,)))
    rows, batch = slice(10, 37), (slice(1, 2), slice(1, 3))
    chunk_options = dict(score_mod=wobble, score_mod_grad=wobble_grad, mask_mod=own_entry,
                         mask_mod_args=(ids,), chunk_of=((2, 3), (1, 1), 10, 0, mask_batch))
    chunk = (query[batch][..., rows, :], key[batch], value[batch])
    for functions in (FASTATTN, REFERENCE):
        forward = functions[0]
        whole_out = forward(query, key, value, **forward_options(whole_options))
        chunk_out = forward(*chunk, **forward_options(chunk_options))
        np.testing.assert_allclose(chunk_out, whole_out[batch][..., rows, :], rtol=1e-10,
                                   atol=1e-12)
        whole_grads = forward_and_backward(functions, query, key, value, None, grad_out,
                                           **whole_options)
        chunk_grads = forward_and_backward(functions, *chunk, None,
                                           grad_out[batch][..., rows, :], **chunk_options)
        np.testing.assert_allclose(chunk_grads[0], whole_grads[0][batch][..., rows, :],
                                   rtol=1e-10, atol=1e-12)


def test_chunk_of_refuses_a_block_mask():
    query, key, value = random_inputs(np.random.default_rng(0), (2, 3, 4, 8), (2, 3, 5, 8))
    block_mask = fastattn.create_block_mask(prefix_lm, (2, 3), 4, 5)
    for attention in IMPLEMENTATIONS.values():
        with pytest.raises(ValueError, match="chunk_of cannot be combined with a block_mask"):
            attention(query, key, value, block_mask=block_mask,
                      chunk_of=((2, 3), (0, 0), 0, 0))
    with pytest.raises(ValueError, match="chunk_of"):
        fastattn.scaled_dot_product_attention(query, key, value, mask_mod=prefix_lm,
                                              chunk_of=((2, 3), (0, 0), 0, 0, (2, 2)))
