"""The fixed chain: planning, training a fold, validation/postprocessing/evaluation/report, prediction."""
