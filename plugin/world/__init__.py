"""The evidence world: procedural images, captions, a tiny base model, and the concept-extraction measurements."""
