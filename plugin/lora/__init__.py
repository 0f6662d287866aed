"""Reading LoRA files of every layout (kohya, diffusers, PEFT, LyCORIS, ai-toolkit, BFL) into per-layer deltas."""
