"""kvpolicy's conformance suite, on the cases conftest.py declares."""

from kvpolicy.testing import CachePolicyConformance


class TestKeyNormConformance(CachePolicyConformance):
    pass
