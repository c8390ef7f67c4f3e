"""Per-fold HTML/JSON reports."""
