"""Runtime modules with packed storage, and module surgery."""
from .int8_linear import Int8Conv2d, Int8Linear, to_int8_
from .quant_conv import QuantConv2d, check_conv
from .quant_linear import QuantLinear
from .surgery import (DEFAULT_EXCLUDE, check_selection, find_linears, name_filter, packed_like, set_module,
                      weight_matrix)

__all__ = ["Int8Conv2d", "Int8Linear", "to_int8_", "QuantConv2d", "check_conv", "QuantLinear", "DEFAULT_EXCLUDE", "check_selection", "find_linears", "name_filter",
           "packed_like", "set_module", "weight_matrix"]
