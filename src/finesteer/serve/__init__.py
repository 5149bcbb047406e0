"""`finesteer serve`: an OpenAI-compatible server that applies head-level interventions per request.

Needs the `serve` extra (fastapi, uvicorn). Nothing else in finesteer imports this package, so
`import finesteer` never imports fastapi.
"""

from finesteer.serve.app import ServeConfig, create_app
from finesteer.serve.engine import Engine, Job
from finesteer.serve.errors import ServeError
from finesteer.serve.registry import InterventionRegistry
from finesteer.serve.sampling import SamplingParams

__all__ = [
    "Engine",
    "InterventionRegistry",
    "Job",
    "SamplingParams",
    "ServeConfig",
    "ServeError",
    "create_app",
]
