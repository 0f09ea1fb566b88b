"""stagerl: STAGE (arXiv 2509.25027) -- stable GRPO fine-tuning of autoregressive text-to-image models."""

__version__ = "0.1.0"
