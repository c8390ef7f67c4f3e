"""Prompts (boxes, clicks), automatic prompts, the refinement engine and the terminal loop."""
