"""The concept as text and as a subspace: presets, the text encoders that read them, the orthonormal basis they
span, and its serialised form in a file's header."""
