"""Sensitivity criteria and mixed-precision bit allocation (all fed by :mod:`qbayes.curvature`)."""
