"""Inference: block-diffusion sampling, evaluation and reports."""
