"""Data loaders."""
from .text import CALIB_TEXT, EVAL_TEXT, calibration_windows, data_dir, data_path, eval_windows, tokenize_file

__all__ = ["CALIB_TEXT", "EVAL_TEXT", "calibration_windows", "data_dir", "data_path", "eval_windows", "tokenize_file"]
