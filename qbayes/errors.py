"""Exceptions raised by qbayes.

Every error a user can trigger with bad input is a :class:`QBayesError` (a ``ValueError``),
so callers can catch one type, and the message says what was wrong and what to do.
"""
from __future__ import annotations


class QBayesError(ValueError):
    """Bad input or state detected by qbayes; the message names the problem."""


class CheckpointError(QBayesError):
    """A checkpoint on disk is missing, corrupt, truncated or not a qbayes checkpoint."""


class CalibrationError(QBayesError):
    """Calibration data is missing, empty or unusable."""


class KernelError(QBayesError, RuntimeError):
    """A fast kernel was asked for where it cannot run (not built, not installed, a layout it
    does not take); the reference path always works."""
