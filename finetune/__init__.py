"""Fine-tuning: recipes, model loading, LoRA, the block-diffusion objective, the trainer, merge and push."""
