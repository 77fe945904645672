"""SNLP solvers: the plan notation, the surrogate Jacobians and the one update loop."""

from .newton import SolveResult, SolverDivergence, snlp_forward, snlp_solve
from .plan import METHODS, PlanError, SolverPlan

__all__ = ["METHODS", "PlanError", "SolveResult", "SolverDivergence", "SolverPlan", "snlp_forward", "snlp_solve"]
