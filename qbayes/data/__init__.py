"""Data loaders."""
from .cifar import load_cifar10_test
from .idx import IMAGE_STATS, load_image_dataset, read_idx
from .text import (CALIB_TEXT, EVAL_TEXT, calibration_windows, data_dir, data_path, encoder_windows, eval_windows,
                   readable_text, sentence_lines, tokenize_file)
from .vision_splits import classifier_splits
from .uci import UCI_SETS, UCISplit, load_uci_split, n_splits

__all__ = ["classifier_splits", "CALIB_TEXT", "EVAL_TEXT", "IMAGE_STATS", "UCI_SETS", "UCISplit", "calibration_windows", "data_dir",
           "data_path", "encoder_windows", "eval_windows", "load_cifar10_test", "load_image_dataset", "load_uci_split", "n_splits", "read_idx",
           "readable_text", "sentence_lines", "tokenize_file"]
