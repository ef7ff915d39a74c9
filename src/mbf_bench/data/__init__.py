"""Data sets of the benchmark (the paper's experiments, DESIGN.md section 3).

Every loader returns tensors ready for training (:class:`Split`; :class:`Graph` for the GCN,
:class:`Text` for the GPT) and reports a missing, corrupt or unsafe file with one
:class:`DataError` that names the file and the remedy. No loader downloads anything;
docs/data.md says where each file comes from.
"""

from .autoencoders import load_curves_mat, load_digits, load_faces_mat
from .cifar import NORMALIZATION, augment_cifar, black_level, load_cifar
from .curves import make_curves
from .errors import DataError
from .mnist import load_mnist
from .planetoid import Graph, load_planetoid
from .safe_pickle import restricted_load
from .split import Split
from .text import Text, load_text

__all__ = [
    "NORMALIZATION",
    "DataError",
    "Graph",
    "Split",
    "Text",
    "augment_cifar",
    "black_level",
    "load_cifar",
    "load_curves_mat",
    "load_digits",
    "load_faces_mat",
    "load_mnist",
    "load_planetoid",
    "load_text",
    "make_curves",
    "restricted_load",
]
