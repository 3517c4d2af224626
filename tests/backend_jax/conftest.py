"""JAX test process setup: 4 virtual CPU devices (sharding tests) and float64 support.

Both must happen before JAX initialises its backend, so they are set here, before any test
module imports JAX.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
