"""Comparing finished runs: paired differences, agreement, kept-set overlap, Pareto fronts."""
