"""How well a CLIP and its explanations do, kept apart from what serving needs.

- :mod:`.scenes`: generated captioned scenes of coloured shapes with known boxes (the demo model's world);
- :mod:`.retrieval`: retrieval top-1 and the swapped-caption binding test on those scenes;
- :mod:`.grounding`: the grounding benchmark (``python -m attribution.evaluation.grounding``).

Nothing under ``service/`` imports this package; it may use plotting libraries (an optional extra).
"""
