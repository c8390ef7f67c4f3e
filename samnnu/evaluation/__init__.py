"""Metrics (pure functions of label arrays), folder evaluation, and the summary across folds and models."""
