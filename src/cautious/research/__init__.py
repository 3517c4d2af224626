"""``cautious research``: a small character-level language model trained with and without caution.

The same transformer (:mod:`cautious.research.model`) is trained in every installed framework
from the same initial weights on the same batches of the Python standard library's own source
(:mod:`cautious.research.data`), over a grid of optimizers, learning rates and seeds
(:mod:`cautious.research.run`); :mod:`cautious.research.report` turns the runs into
``research.md``, ``research.json`` and PNG plots. See docs/research.md.
"""

from cautious.research.run import HPARAMS, VARIANTS, build_parser, main

__all__ = ["HPARAMS", "VARIANTS", "build_parser", "main"]
