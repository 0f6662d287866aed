"""The ``concept-exclusion`` command line: ``main`` dispatches to the verbs registered as entry points (``audit``
and ``inspect`` here; ``train`` from ``integrations.train``; ``demo`` from the evidence world)."""
