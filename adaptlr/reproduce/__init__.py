"""Small-scale reproductions of the seed papers' claims (``adaptlr reproduce NAME``).

Everything runs on scikit-learn's bundled digits data (nothing is downloaded) with softmax regression
or a small MLP whose forward and backward passes are written against the array API, so every
experiment runs on every backend of :mod:`adaptlr.conformance.backends`. One module per experiment:
:mod:`.activelr`, :mod:`.autodrop`, :mod:`.hypergradient`, :mod:`.dsa`, :mod:`.eg`. scikit-learn and
matplotlib are optional (the ``reproduce`` extra) and imported only when an experiment runs.
"""

EXPERIMENTS = ("activelr", "autodrop", "hypergradient", "dsa", "eg", "schedulefree")

__all__ = ["EXPERIMENTS"]
