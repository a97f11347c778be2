"""Training: DeepSpeed configs, gradient penalty, the two-engine trainer, checkpoints."""
