"""kvpolicy-keynorm: key-norm KV-cache compression (Devoto et al. 2024) as a kvpolicy plugin.

Installed, it registers the ``keynorm`` cache policy and the ``keynorm`` preset::

    import kvpolicy
    from kvpolicy.policies import TSP
    from kvpolicy_keynorm import KeyNorm

    policy = kvpolicy.compose(TSP(layer=20, rate=0.2), KeyNorm(budget=0.3))
    same_cache = kvpolicy.get_policy("keynorm", kv_budget=0.3)
"""

from kvpolicy_keynorm.policy import KeyNorm, keynorm_keep, keynorm_scores
from kvpolicy_keynorm.preset import KeyNormPreset

__version__ = "0.1.0"

__all__ = ["KeyNorm", "KeyNormPreset", "keynorm_keep", "keynorm_scores"]
