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

from rainforest.kernels._flags import register_tile_columns

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
