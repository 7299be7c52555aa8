"""Detectors of poisoned inputs: ``score(x) -> (N,)``, higher = more suspicious."""
