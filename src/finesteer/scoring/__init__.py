"""Scoring: next-token probabilities of prompts under interventions (one A/B letter scorer).

`finesteer.scoring.forward` holds the batched scoring forward; `finesteer.scoring.ab` the A/B
letter-probability scorer (`ABPrompt`, `LetterTarget`, `OptionScores`, `ABScorer`) and the answer
parser; `finesteer.scoring.prefix` the prefix KV caches the scorer reuses.
"""
