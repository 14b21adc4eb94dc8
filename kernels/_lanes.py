"""SIMD vectors of float32 as values a compiled kernel can hold in local variables.

The loop vectoriser turns a loop over contiguous elements into vector instructions, but it
cannot keep a block of outputs in registers across an outer loop: it stores every output back
to memory once per outer iteration, because it cannot prove that the output does not overlap
the inputs. A register-tiled product needs the opposite: a few vectors of outputs held in
registers while the whole reduction streams past. :data:`LANES_TYPE` is one vector of
:data:`LANES` float32 as a Numba type whose LLVM form is ``<LANES x float>``, so a local
variable of that type is an SSA value, held in registers (LLVM splits a vector wider than one
register across several); the intrinsics load, widen, multiply-add and store such vectors.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from rainforest.kernels._flags import bfloat16_dot_products, register_tile_columns

#: float32 per vector: one stream's row of a register tile, 4 AVX-512 or 2 AVX2 registers.
LANES = register_tile_columns()


class _Lanes(types.Type):
    def __init__(self):
        super().__init__(name=f"float32x{LANES}")


#: The Numba type of one vector of :data:`LANES` float32.
LANES_TYPE = _Lanes()


@register_model(_Lanes)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), LANES))


def _c_matrix(matrix):
    """A vector spans consecutive elements, so only a C-contiguous matrix will do."""
    return isinstance(matrix, types.Array) and matrix.ndim == 2 and matrix.layout == "C"


def _element_pointer(context, builder, signature, args):
    """The address of ``matrix[row, column]`` (args: matrix, row, column)."""
    matrix_type, row_type, column_type = signature.args[:3]
    matrix = context.make_array(matrix_type)(context, builder, args[0])
    indices = [context.cast(builder, args[1], row_type, types.intp),
               context.cast(builder, args[2], column_type, types.intp)]
    return cgutils.get_item_pointer(context, builder, matrix_type, matrix, indices)


def _widened(builder, vector, dtype):
    """Stored weights as float32 lanes, exactly as ``fused_loop._widen`` widens one."""
    floats = ir.VectorType(ir.FloatType(), LANES)
    if dtype == types.uint16:  # bfloat16: the high half of a float32
        words = builder.zext(vector, ir.VectorType(ir.IntType(32), LANES))
        shifted = builder.shl(words, ir.Constant(words.type, [16] * LANES))
        return builder.bitcast(shifted, floats)
    if dtype == types.int8:
        return builder.sitofp(vector, floats)
    return vector


@intrinsic
def load_lanes(typingctx, matrix, row, column):
    """``matrix[row, column:column + LANES]`` widened to float32 lanes (float32, bfloat16 as
    uint16 or int8 elements; C-contiguous rows, no bounds check)."""
    if not _c_matrix(matrix) or matrix.dtype not in (types.float32, types.uint16, types.int8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        stored = ir.VectorType(pointer.type.pointee, LANES)
        vector = builder.load(builder.bitcast(pointer, stored.as_pointer()),
                              align=signature.args[0].dtype.bitwidth // 8)
        return _widened(builder, vector, signature.args[0].dtype)

    return LANES_TYPE(matrix, row, column), codegen


@intrinsic
def store_lanes(typingctx, matrix, row, column, lanes):
    """``matrix[row, column:column + LANES] = lanes`` for a C-contiguous float32 matrix."""
    if not _c_matrix(matrix) or matrix.dtype != types.float32:
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        vector_pointer = builder.bitcast(pointer, args[3].type.as_pointer())
        builder.store(args[3], vector_pointer, align=4)
        return context.get_dummy_value()

    return types.void(matrix, row, column, lanes), codegen


@intrinsic
def multiply_add(typingctx, total, factor, lanes):
    """``total + factor * lanes`` in every lane: a float32 multiply and add that may contract to
    one fused multiply-add, exactly as the scalar ``o + a * w`` of a ``contract`` kernel."""
    if total != LANES_TYPE or factor != types.float32 or lanes != LANES_TYPE:
        return None

    def codegen(context, builder, signature, args):
        total_value, factor_value, lanes_value = args
        vector_type = lanes_value.type
        single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), factor_value,
                                        ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(single, ir.Constant(vector_type, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                   [0] * LANES))
        product = builder.fmul(splat, lanes_value)
        product.flags.append("contract")
        total_value = builder.fadd(total_value, product)
        total_value.flags.append("contract")
        return total_value

    return LANES_TYPE(total, factor, lanes), codegen


# --- vectors of any width ------------------------------------------------------------------
# The training kernels tile products whose widths are multiples of 16 (64, 32 or 16 columns
# at a time), so their vectors take the width as a literal argument. On AVX-512 a vector of
# 16 float32 is one register; LLVM splits a wider one across several (and on AVX2 every one).


class Vector(types.Type):
    """``width`` float32 held as one value, as :data:`LANES_TYPE` is for :data:`LANES`."""

    def __init__(self, width: int):
        self.width = width
        super().__init__(name=f"float32_vector{width}")


_VECTORS: dict[int, Vector] = {}


def vector_type(width: int) -> Vector:
    """The one :class:`Vector` type of ``width`` float32."""
    return _VECTORS.setdefault(width, Vector(width))


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.width))


@intrinsic
def load_vector(typingctx, matrix, row, column, width):
    """``matrix[row, column:column + width]`` of a C-contiguous float32 matrix, as a vector;
    ``width`` must be a literal (no bounds check)."""
    if (not _c_matrix(matrix) or matrix.dtype != types.float32
            or not isinstance(width, types.IntegerLiteral)):
        return None
    vector = vector_type(width.literal_value)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        stored = ir.VectorType(ir.FloatType(), vector.width)
        return builder.load(builder.bitcast(pointer, stored.as_pointer()), align=4)

    return vector(matrix, row, column, width), codegen


@intrinsic
def store_vector(typingctx, matrix, row, column, value):
    """``matrix[row, column:column + width] = value`` for a C-contiguous float32 matrix."""
    if not _c_matrix(matrix) or matrix.dtype != types.float32 or not isinstance(value, Vector):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        builder.store(args[3], builder.bitcast(pointer, args[3].type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(matrix, row, column, value), codegen


@intrinsic
def vector_multiply_add(typingctx, total, factor, value):
    """``total + factor * value`` in every lane, contracting to one fused multiply-add as
    :func:`multiply_add` does; ``factor`` is a float32 scalar."""
    if not isinstance(total, Vector) or value != total or factor != types.float32:
        return None

    def codegen(context, builder, signature, args):
        total_value, factor_value, lanes_value = args
        vector = lanes_value.type
        single = builder.insert_element(ir.Constant(vector, ir.Undefined), factor_value,
                                        ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(single, ir.Constant(vector, ir.Undefined),
                                       ir.Constant(ir.VectorType(ir.IntType(32), vector.count),
                                                   [0] * vector.count))
        product = builder.fmul(splat, lanes_value)
        product.flags.append("contract")
        result = builder.fadd(total_value, product)
        result.flags.append("contract")
        return result

    return total(total, factor, value), codegen



# --- bfloat16 pair products -------------------------------------------------------------------
# A bfloat16 is the upper half of a float32, stored as uint16. VDPBF16PS (AVX512_BF16) adds to
# each float32 lane the two products of a pair of bfloat16 lanes; the pairs run along the sum
# (two consecutive k). Its result is the float32 lane + a[1] * b[1] + a[0] * b[0], each product
# exact (8 x 8 significant bits) and each addition rounded to nearest even, as two fused
# multiply-adds in that order give: the emulation for CPUs without it (subnormals aside, which
# VDPBF16PS flushes to zero).


class _BFloat(ir.Type):
    """LLVM's ``bfloat``, which llvmlite does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_DOT_PAIRS = "llvm.x86.avx512bf16.dpbf16ps.512"


def _pairs_pointer(context, builder, matrix_type, matrix, row, row_type, column, column_type):
    array = context.make_array(matrix_type)(context, builder, matrix)
    indices = [context.cast(builder, row, row_type, types.intp),
               context.cast(builder, column, column_type, types.intp)]
    return cgutils.get_item_pointer(context, builder, matrix_type, array, indices)


def _dot_pairs_native(builder, total, pairs, factor):
    """``total`` (<16 x float>) + pair products of ``pairs`` and ``factor`` (<16 x i32> each)."""
    vector16 = ir.VectorType(ir.FloatType(), 16)
    bfloats = ir.VectorType(_BFloat(), 32)
    module = builder.module
    function = module.globals.get(_DOT_PAIRS) or ir.Function(
        module, ir.FunctionType(vector16, [vector16, bfloats, bfloats]), name=_DOT_PAIRS)
    return builder.call(function, [total, builder.bitcast(pairs, bfloats),
                                   builder.bitcast(factor, bfloats)])


def _dot_pairs_emulated(builder, total, pairs, factor):
    """As :func:`_dot_pairs_native`, with two fused multiply-adds per lane (odd, then even)."""
    count = total.type.count
    words = ir.VectorType(ir.IntType(32), count)
    floats = total.type
    high = ir.Constant(words, [0xFFFF0000] * count)
    shift = ir.Constant(words, [16] * count)
    name = f"llvm.fma.v{count}f32"
    fma = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(floats, [floats] * 3), name=name)
    for half in (1, 0):  # the odd bfloat16 of each pair first, as VDPBF16PS adds them
        if half:
            a = builder.bitcast(builder.and_(pairs, high), floats)
            b = builder.bitcast(builder.and_(factor, high), floats)
        else:
            a = builder.bitcast(builder.shl(pairs, shift), floats)
            b = builder.bitcast(builder.shl(factor, shift), floats)
        total = builder.call(fma, [a, b, total])
    return total


class PairVector(types.Type):
    """``width`` pairs of bfloat16 (``2 * width`` uint16) held as one value."""

    def __init__(self, width: int):
        self.width = width
        super().__init__(name=f"bfloat16_pairs{width}")


_PAIR_VECTORS: dict[int, PairVector] = {}


def pair_vector_type(width: int) -> PairVector:
    return _PAIR_VECTORS.setdefault(width, PairVector(width))


@register_model(PairVector)
class _PairVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(32), fe_type.width))


def _uint16_matrix(matrix):
    return _c_matrix(matrix) and matrix.dtype == types.uint16


@intrinsic
def load_pairs(typingctx, matrix, row, column, width):
    """``matrix[row, column:column + 2 * width]`` of a C-contiguous uint16 matrix as ``width``
    bfloat16 pairs; ``width`` must be a literal (no bounds check)."""
    if not _uint16_matrix(matrix) or not isinstance(width, types.IntegerLiteral):
        return None
    pairs = pair_vector_type(width.literal_value)

    def codegen(context, builder, signature, args):
        pointer = _pairs_pointer(context, builder, signature.args[0], args[0], args[1],
                                 signature.args[1], args[2], signature.args[2])
        words = ir.VectorType(ir.IntType(32), pairs.width)
        return builder.load(builder.bitcast(pointer, words.as_pointer()), align=2)

    return pairs(matrix, row, column, width), codegen


@intrinsic
def pair_multiply_add(typingctx, total, pairs, factors, row, column):
    """``total`` + for each lane i: the two products of pair i of ``pairs`` with the pair
    ``factors[row, column:column + 2]`` (a C-contiguous uint16 matrix; no bounds check).
    ``total`` is a :class:`Vector` of a multiple of 16 lanes, ``pairs`` as wide."""
    if (not isinstance(total, Vector) or total.width % 16 or pairs != pair_vector_type(
            total.width) or not _uint16_matrix(factors)):
        return None

    def codegen(context, builder, signature, args):
        native = bfloat16_dot_products()  # asked at each compile: tests switch it off
        count = total.width
        words = ir.VectorType(ir.IntType(32), count)
        factor_pointer = _pairs_pointer(context, builder, signature.args[2], args[2], args[3],
                                        signature.args[3], args[4], signature.args[4])
        word = builder.load(builder.bitcast(factor_pointer, ir.IntType(32).as_pointer()),
                            align=2)
        single = builder.insert_element(ir.Constant(words, ir.Undefined), word,
                                        ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(single, ir.Constant(words, ir.Undefined),
                                       ir.Constant(words, [0] * count))
        if not native:
            return _dot_pairs_emulated(builder, args[0], args[1], splat)
        pieces = []
        for first in range(0, count, 16):
            lanes = ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(first, first + 16)))
            part = [builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), lanes)
                    for v in (args[0], args[1], splat)]
            pieces.append(_dot_pairs_native(builder, *part))
        while len(pieces) > 1:  # concatenate, two at a time
            width = pieces[0].type.count
            order = ir.Constant(ir.VectorType(ir.IntType(32), 2 * width), list(range(2 * width)))
            pieces = [builder.shuffle_vector(pieces[i], pieces[i + 1], order)
                      for i in range(0, len(pieces), 2)]
        return pieces[0]

    return total(total, pairs, factors, row, column), codegen
