"""The two-layer graph convolutional network of Kipf & Welling (ICLR 2017).

``logits = A dropout(relu(A dropout(X) W1^T)) W2^T``: each graph convolution is an
``nn.Linear`` (so MBF's Linear mini-block rule applies to its weight) followed by a sparse
matrix product with the normalized adjacency ``A``. As in the reference code: no bias,
Glorot-uniform weights, dropout on the input and hidden features, ReLU between the layers; the
paper's weight decay (5e-4) applies to the first layer only (``model.layer1``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GCN(nn.Module):
    """Two graph convolutions: ``in_features -> hidden -> num_classes``."""

    def __init__(
        self, in_features: int, hidden: int = 16, num_classes: int = 7, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.layer1 = nn.Linear(in_features, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, num_classes, bias=False)
        self.dropout = dropout
        for layer in (self.layer1, self.layer2):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        """Logits (N, num_classes) for features ``x`` (N, F) and ``adjacency`` (N, N), sparse
        (COO/CSR) or dense, normally ``D^-1/2 (A + I) D^-1/2``."""
        h = F.dropout(x, self.dropout, self.training)
        h = F.relu(adjacency @ self.layer1(h))
        h = F.dropout(h, self.dropout, self.training)
        return adjacency @ self.layer2(h)
