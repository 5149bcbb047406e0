"""What to do at a site: ops, position scopes, edits and the context manager that applies them."""

from finesteer.interventions.apply import intervene
from finesteer.interventions.edit import (
    AblationMethod,
    Edit,
    Intervention,
    InterventionError,
    ablate_head,
    ablate_heads,
    check_eps,
    project_out,
    steer_head,
    steer_residual,
)
from finesteer.interventions.ops import OP_KINDS, Add, Op, OpError, ProjectOut, Scale, SetTo, Zero
from finesteer.interventions.scope import Scope, ScopeError

__all__ = [
    "OP_KINDS",
    "AblationMethod",
    "Add",
    "Edit",
    "Intervention",
    "InterventionError",
    "Op",
    "OpError",
    "ProjectOut",
    "Scale",
    "Scope",
    "ScopeError",
    "SetTo",
    "Zero",
    "ablate_head",
    "ablate_heads",
    "check_eps",
    "intervene",
    "project_out",
    "steer_head",
    "steer_residual",
]
