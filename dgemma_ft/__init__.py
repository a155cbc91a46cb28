"""dgemma-ft: fine-tune block-diffusion language models (DiffusionGemma) on structured tasks."""

__version__ = "0.1.0"
