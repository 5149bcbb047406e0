"""Locate stage: score every attention head for a behaviour and rank them.

Every method returns (or builds) a :class:`HeadScores` table, layer × head, so rankings from
different methods and models can be compared, saved, plotted and fed to the fit/intervene stages.
Import the method modules directly (`finesteer.locate.ships`, `finesteer.locate.sahara`, …); this
package only re-exports the shared table type so importing it stays cheap.
"""

from __future__ import annotations

from finesteer.locate.scores import HeadScores, HeadScoresError, hash_prompts, jaccard_top_k

__all__ = ["HeadScores", "HeadScoresError", "hash_prompts", "jaccard_top_k"]
