"""Small-scale reproductions of the seed papers' claims (``adaptlr reproduce NAME``).

Everything runs on scikit-learn's bundled digits data or on MNIST-1D generated locally (nothing is
downloaded; :mod:`.data`) with softmax regression, a small MLP (:mod:`.models`) or a small 1-D CNN
(:mod:`.cnn`) whose forward and backward passes are written against the array API, so every
experiment runs on every backend of :mod:`adaptlr.conformance.backends`. One module per experiment:
:mod:`.activelr`, :mod:`.autodrop`, :mod:`.hypergradient`, :mod:`.dsa`, :mod:`.eg`; each states its
claims as computed checks (:mod:`.verdict`). scikit-learn, matplotlib and mnist1d are optional (the
``reproduce`` extra) and imported only when an experiment runs.
"""

EXPERIMENTS = ("activelr", "autodrop", "hypergradient", "dsa", "eg", "schedulefree")

__all__ = ["EXPERIMENTS"]
