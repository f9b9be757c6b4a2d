"""Predict-only evaluation: the LightningModule, the prediction writer, the final report."""

from pore.app.evaluation.module import VLMEvaluator
from pore.app.evaluation.progress import LiveMetricProgressBar
from pore.app.evaluation.writer import PredictionWriter

__all__ = ["LiveMetricProgressBar", "PredictionWriter", "VLMEvaluator"]
