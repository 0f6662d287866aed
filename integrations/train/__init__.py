"""``concept-exclusion train``: LoRA training of a diffusers model with the exclusion attached.

An integration, not part of the core: it trains through the diffusers helpers (``integrations.diffusers``);
``concept_exclusion.commands`` dispatches to it through its entry point.
"""
