"""The evidence world behind ``concept-exclusion demo`` (world 3), kept out of the library.

A small procedural world with a real pretrained text encoder (all-MiniLM-L6-v2), a protected panda
emblem, an allowed tiger emblem and co-occurring new content, where plain training, baselines and
the library's methods are compared against a calibration gate and a bar computed by code. It uses
only the public API of ``concept_exclusion``; the library never imports it. See docs/evidence.md.
"""
