"""Scores of masks and objects, and the objects themselves (watershed, sizes, ROI sets). Imports core
and data."""
