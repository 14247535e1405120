"""Numba types of the kernels' argument groups (built by :mod:`fastattn.layout`).

Each group is a named tuple; the kernels read its fields by name
(``inputs.key``, ``bias.present``). Arrays are typed read-only and
C-contiguous, so one compiled kernel per dtype serves every call.
"""

import numba
import numpy as np
from numba import types

from fastattn.layout import (BackwardInputs, ForwardOutputs, Gradients, Inputs, KeySpans,
                             ScoreOperand, ScoreOptions, Tiling, Visibility)


def array_type(dtype, ndim, readonly=True):
    """Numba type of a C-contiguous array of ``dtype``."""
    return types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C", readonly=readonly)


def group_type(group_class, field_types):
    """Numba type of a named tuple of ``group_class`` with these field types, as
    :func:`numba.typeof` would give it (homogeneous fields make a ``NamedUniTuple``)."""
    assert len(field_types) == len(group_class._fields)
    return types.BaseTuple.from_types(tuple(field_types), group_class)


def score_operand_type(dtype):
    """A mask (``dtype`` bool) or bias operand."""
    return group_type(ScoreOperand, (array_type(dtype, 3), array_type(np.int64, 1),
                                     types.int64, types.int64, types.boolean))


def problem_types(dtype):
    """Types of the groups of :func:`fastattn.layout.problem_arguments`:
    ``(Inputs, ScoreOptions, mask, bias, Visibility)`` for data of ``dtype``."""
    data3, index = array_type(dtype, 3), array_type(np.int64, 1)
    inputs = group_type(Inputs, (data3, data3, data3, index, index, index))
    options = group_type(ScoreOptions, (types.float64, types.float64, types.boolean,
                                        array_type(np.float64, 1), types.boolean,
                                        types.int64, types.boolean, types.boolean,
                                        types.int64, types.int64))
    visibility = group_type(Visibility, (index, types.boolean, types.int64, types.int64,
                                         types.int64, array_type(np.int8, 3), types.boolean))
    return (inputs, options, score_operand_type(np.bool_), score_operand_type(dtype),
            visibility)


TILING_TYPE = group_type(Tiling, (types.int64, types.int64, types.int64))


def forward_result_types(dtype):
    """Types of ``(ForwardOutputs, KeySpans)`` for data of ``dtype``."""
    outputs = group_type(ForwardOutputs, (array_type(dtype, 3, readonly=False),
                                          array_type(dtype, 2, readonly=False),
                                          array_type(dtype, 3, readonly=False), types.boolean))
    spans = group_type(KeySpans, (types.int64, array_type(dtype, 4, readonly=False),
                                  array_type(dtype, 3, readonly=False)))
    return outputs, spans


def backward_types(dtype):
    """Types of ``(BackwardInputs, Gradients)`` for data of ``dtype``."""
    extra = group_type(BackwardInputs, (array_type(dtype, 3), array_type(dtype, 2),
                                        array_type(dtype, 2)))
    gradients = group_type(Gradients, (array_type(dtype, 4, readonly=False),
                                       array_type(dtype, 3, readonly=False),
                                       array_type(dtype, 3, readonly=False),
                                       array_type(np.bool_, 1, readonly=False)))
    return extra, gradients
