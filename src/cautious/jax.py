"""``cautious.jax``: cautious optimizers as optax GradientTransformations.

>>> import optax
>>> from cautious.jax import adamw, cautious
>>> opt = optax.chain(optax.clip_by_global_norm(1.0), adamw(1e-3))

Implemented in :mod:`cautious.backends.jax`; see there for notes, and :mod:`cautious.spec`
for the algorithm.
"""

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without the extra installed
    raise ImportError("cautious.jax needs JAX and optax: pip install 'cautious[jax]'") from e

from cautious.backends.jax import *  # noqa: F403
from cautious.backends.jax import __all__  # noqa: F401
