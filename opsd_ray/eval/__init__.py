"""Evaluation: math grading, benchmarks, sampling metrics (avg@k, pass@k, maj@k), epistemic markers."""

from opsd_ray.eval.grading import extract_answer, is_correct
from opsd_ray.eval.markers import MARKERS, count_markers

__all__ = ["MARKERS", "count_markers", "extract_answer", "is_correct"]
