"""``concept-exclusion audit``: what a LoRA file's weights do to a trusted preset's concept subspace, against a
trusted base model. Never imported by the training path."""
