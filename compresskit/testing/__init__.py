"""Public testing helpers for compresskit and for third-party plugin authors.

Tiny factories, a registry built on a fresh plugin manager, and conformance checks that every
plugin (built-in or third party) should pass::

    from compresskit.testing import check_metric
    from compresskit_example_plugin.ria import RIAMetric

    def test_conformance():
        check_metric(RIAMetric)

Each ``check_*`` raises :class:`PluginConformanceError` (an ``AssertionError``, so pytest shows
it as a test failure) whose message names the broken rule and how to fix it, and returns the
list of checks that passed.
"""

from __future__ import annotations

from compresskit.testing._base import PluginConformanceError
from compresskit.testing.conformance import check_metric, check_pattern, check_solver, check_statistic
from compresskit.testing.runs import check_adapter, check_allocation, check_hooks
from compresskit.testing.factories import fresh_registry, random_inputs, random_linear, registry_names, tiny_model

__all__ = [
    "PluginConformanceError",
    "check_adapter",
    "check_allocation",
    "check_hooks",
    "check_metric",
    "check_pattern",
    "check_solver",
    "check_statistic",
    "fresh_registry",
    "random_inputs",
    "random_linear",
    "registry_names",
    "tiny_model",
]
