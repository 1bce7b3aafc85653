"""Health checks run in the background, served to Kubernetes probes from a cache.

Other parts add checks of the sidecar itself with ``HealthRunner.add_builtin``; their probe
returns an ``Outcome`` or raises ``CheckFailed``.
"""

from sidecar.health.checks import CheckFailed, Measurement, Outcome
from sidecar.health.runner import HealthRunner

__all__ = ["CheckFailed", "HealthRunner", "Measurement", "Outcome"]
