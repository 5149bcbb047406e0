"""Fit stage: turn located sites plus training data into a concrete intervention (directions, σ, α).

Every `fit_*` function returns a `finesteer.fit.steering.Steering`, the one result type the
comparisons, the refusal experiment and the CLI consume, so methods (HSI, ITI, CAA, …) are
interchangeable there.
"""
