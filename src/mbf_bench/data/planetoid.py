"""Planetoid citation graphs (Cora, CiteSeer, PubMed) in the split of Yang et al. (2016).

Files ``ind.<name>.{x,y,tx,ty,allx,ally,graph,test.index}`` as distributed with the Planetoid
and GCN code: Python-2 pickles of SciPy CSR matrices (features), one-hot NumPy arrays (labels)
and a dict of adjacency lists, read through the restricted unpickler (NumPy arrays, CSR
matrices, ``defaultdict`` and ``list`` only), plus a text file of test node ids.

Preprocessing follows Kipf & Welling's reference code (``gcn/utils.py``):

- node i is row i: the first ``len(allx)`` nodes are those of ``allx``/``ally``, test node
  ``test.index[k]`` gets row k of ``tx``/``ty``. Ids missing from the test range (CiteSeer's
  isolated test nodes) get zero features and no label, as in Kipf's code;
- features are row-normalized (rows summing to 1, all-zero rows left at 0);
- adjacency: the graph made undirected and unweighted (duplicate edges collapse), then
  ``D^-1/2 (A + I) D^-1/2`` with D the row sums of A + I, as a sparse COO tensor;
- split: the first ``len(y)`` nodes train (140 for Cora), the next 500 validation, the test
  ids test (1000).

Labels are the argmax of the one-hot rows; a node without a label (all-zero row) gets -1 and is
left out of every mask (Kipf's code would call it class 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .errors import DataError
from .paths import DATA_DIR_HINT, describe, existing_dir, search_dirs
from .safe_pickle import CONTAINERS, NUMPY_ARRAYS, SCIPY_CSR, restricted_load

PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")
NUM_VAL = 500
_ALLOWED = NUMPY_ARRAYS | SCIPY_CSR | CONTAINERS


@dataclass
class Graph:
    """A node-classification graph, ready for a GCN.

    ``features`` (N, F) float32 dense, row-normalized; ``adjacency`` (N, N) sparse COO float32
    ``D^-1/2 (A + I) D^-1/2``; ``labels`` (N,) int64 (-1 = unlabelled); boolean masks (N,).
    """

    features: Tensor
    adjacency: Tensor
    labels: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int


def _find_folder(data_dir: str | Path, name: str) -> Path:
    root = existing_dir(data_dir, f"Planetoid {name}")
    title = name.capitalize()
    dirs = search_dirs(
        root,
        [
            "planetoid",
            "data",
            name,
            f"{title}/raw",
            f"{name}/raw",
            "planetoid/data",
            f"planetoid/{title}/raw",
        ],
    )
    for folder in dirs:
        if (folder / f"ind.{name}.x").is_file():
            return folder
    raise DataError(
        f"Planetoid {name}: no ind.{name}.x (and the other ind.{name}.* files) in "
        f"{describe(dirs)}; put the files of kimiyoung/planetoid (data/) there and "
        f"{DATA_DIR_HINT}."
    )


def _sparse(obj: Any, path: Path) -> sp.csr_matrix:
    """A fresh, validated CSR matrix from an unpickled CSR matrix or dense array."""
    try:
        if isinstance(obj, np.ndarray) and obj.ndim == 2:
            return sp.csr_matrix(obj.astype(np.float32))
        if isinstance(obj, sp.csr_matrix):
            # Rebuild from the raw arrays: an old pickle's object may lack newer attributes.
            matrix = sp.csr_matrix(
                (
                    np.asarray(obj.data, dtype=np.float32),
                    np.asarray(obj.indices),
                    np.asarray(obj.indptr),
                ),
                shape=obj.shape,
            )
            matrix.check_format(full_check=True)
            return matrix
    except Exception as exc:
        raise DataError(f"{path}: inconsistent sparse matrix ({exc}); replace the file.") from exc
    raise DataError(f"{path}: holds a {type(obj).__name__}, expected a feature matrix")


def _one_hot(obj: Any, path: Path) -> np.ndarray:
    if not isinstance(obj, np.ndarray) or obj.ndim != 2:
        raise DataError(
            f"{path}: holds {type(obj).__name__} {getattr(obj, 'shape', '')}, expected a 2-D "
            "one-hot label array."
        )
    return np.asarray(obj)


def _test_index(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    if not re.fullmatch(r"\s*(\d+\s*)+", text):
        raise DataError(f"{path}: expected one non-negative node id per line; replace the file.")
    ids = np.array([int(tok) for tok in text.split()], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: repeated node ids; replace the file.")
    return ids


def _adjacency(graph: Any, num_nodes: int, path: Path) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of the undirected, unweighted graph, sparse COO float32."""
    if not isinstance(graph, dict):
        raise DataError(f"{path}: holds a {type(graph).__name__}, expected a dict of lists")
    try:
        src = np.array([u for u, nbrs in graph.items() for _ in nbrs], dtype=np.int64)
        dst = np.array([v for nbrs in graph.values() for v in nbrs], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: adjacency lists must hold integer node ids ({exc})") from exc
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_nodes):
        raise DataError(
            f"{path}: node ids outside 0..{num_nodes - 1} (the number of feature rows); the "
            "files do not belong together."
        )
    return normalized_adjacency(src, dst, num_nodes)


def normalized_adjacency(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2``, sparse COO float32, for the edges ``src[k] - dst[k]`` (node ids
    in ``range(num_nodes)``) taken as undirected and unweighted: duplicates collapse."""
    ones = np.ones(len(src), dtype=np.float64)
    a = sp.coo_matrix((ones, (src, dst)), shape=(num_nodes, num_nodes)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64) + sp.identity(num_nodes, format="csr")
    inv_sqrt = 1.0 / np.sqrt(np.asarray(a.sum(axis=1)).ravel())
    a = sp.diags(inv_sqrt) @ a @ sp.diags(inv_sqrt)
    coo = a.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(
        indices, values, (num_nodes, num_nodes), check_invariants=True
    ).coalesce()


def load_planetoid(data_dir: str | Path, name: str = "cora") -> Graph:
    """One Planetoid graph (``name`` = cora, citeseer, pubmed) with Kipf & Welling's split."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"load_planetoid: bad data set name {name!r} (e.g. 'cora')")
    folder = _find_folder(data_dir, name)

    def p(part: str) -> Path:
        return folder / f"ind.{name}.{part}"

    raw = {}
    for part in PARTS:
        path = p(part)
        if not path.is_file():
            raise DataError(
                f"{path}: file not found; the Planetoid data set needs all of "
                f"ind.{name}.{{{','.join(PARTS)},test.index}} in one folder."
            )
        raw[part] = restricted_load(path, _ALLOWED, encoding="latin1")
    test_ids = _test_index(p("test.index"))
    allx, tx = _sparse(raw["allx"], p("allx")), _sparse(raw["tx"], p("tx"))
    ally, ty = _one_hot(raw["ally"], p("ally")), _one_hot(raw["ty"], p("ty"))
    num_train = _one_hot(raw["y"], p("y")).shape[0]
    n_known = allx.shape[0]
    if (
        len(test_ids) != tx.shape[0]
        or len(test_ids) != ty.shape[0]
        or ally.shape[0] != n_known
        or tx.shape[1] != allx.shape[1]
        or ty.shape[1] != ally.shape[1]
    ):
        raise DataError(
            f"{folder}: inconsistent shapes (allx {allx.shape}, ally {ally.shape}, tx {tx.shape}, "
            f"ty {ty.shape}, {len(test_ids)} test ids); the ind.{name}.* files do not belong "
            "together."
        )
    if test_ids.min(initial=n_known) < n_known or num_train + NUM_VAL > n_known:
        raise DataError(f"{p('test.index')}: test ids overlap the train/validation nodes.")
    num_nodes = int(test_ids.max(initial=n_known - 1)) + 1

    dense = np.zeros((num_nodes, allx.shape[1]), dtype=np.float32)
    dense[:n_known] = allx.toarray()
    dense[test_ids] = tx.toarray()
    one_hot = np.zeros((num_nodes, ally.shape[1]), dtype=np.float32)
    one_hot[:n_known] = ally
    one_hot[test_ids] = ty
    labels = np.where(one_hot.max(axis=1) > 0, one_hot.argmax(axis=1), -1)

    row_sum = dense.sum(axis=1, keepdims=True)
    dense = np.divide(dense, row_sum, out=np.zeros_like(dense), where=row_sum != 0)

    masks = []
    for ids in (np.arange(num_train), np.arange(num_train, num_train + NUM_VAL), test_ids):
        mask = np.zeros(num_nodes, dtype=bool)
        mask[ids] = True
        masks.append(torch.from_numpy(mask & (labels >= 0)))
    return Graph(
        features=torch.from_numpy(dense),
        adjacency=_adjacency(raw["graph"], num_nodes, p("graph")),
        labels=torch.from_numpy(labels.astype(np.int64)),
        train_mask=masks[0],
        val_mask=masks[1],
        test_mask=masks[2],
        num_classes=int(ally.shape[1]),
    )
