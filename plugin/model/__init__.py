"""What the exclusion does to a model: the role table of text-reading layers, one walk of the model (``scan``),
the validated plan (targets, readers, settings) and the MMDiT rules."""
