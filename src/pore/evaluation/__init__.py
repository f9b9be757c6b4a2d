"""Predict-only evaluation: the LightningModule, the prediction writer, the final report."""

from pore.evaluation.module import VLMEvaluator
from pore.evaluation.progress import LiveMetricProgressBar
from pore.evaluation.writer import PredictionWriter

__all__ = ["LiveMetricProgressBar", "PredictionWriter", "VLMEvaluator"]
