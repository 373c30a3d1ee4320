"""Runtime modules with packed storage, and module surgery."""
from .quant_linear import QuantLinear
from .surgery import DEFAULT_EXCLUDE, check_selection, find_linears, name_filter, set_module

__all__ = ["QuantLinear", "DEFAULT_EXCLUDE", "check_selection", "find_linears", "name_filter", "set_module"]
