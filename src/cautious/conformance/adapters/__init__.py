"""Conformance adapters for cautious's own backends: the suite drives each backend through them.

One module per backend, each importing its framework (import only the one you need):

==============================================  ===========================================
``cautious.conformance.adapters.torch``         :class:`TorchAdapter` (single/foreach/fused)
``cautious.conformance.adapters.fused``         :class:`FusedAdapter` (the fused kernels directly)
``cautious.conformance.adapters.jax``           :class:`JaxAdapter` (eager or jit)
``cautious.conformance.adapters.tensorflow``    :class:`TFAdapter` (eager, tf.function, XLA)
==============================================  ===========================================

The adapters depend on the backends' public API; no backend imports the suite.
"""
