"""FAR (Freeze And Reconfigure, Vucetic et al., ISCAS 2022) in plain torch + transformers, no Flower: the split
FFN layer, node scores and selection, reconfigure and merge, and the FAR / random-selection methods."""
from .layer import PREACT_STORAGE, SplitFFN
from .method import FAR, NodeSelection, RandomSelection
from .model import (
    ffn_sizes,
    ffn_weights,
    is_reconfigured,
    learner_indices,
    merge,
    node_scores,
    num_learners,
    random_learners,
    reconfigure,
    select_learners,
)

__all__ = [
    "PREACT_STORAGE", "SplitFFN", "FAR", "NodeSelection", "RandomSelection", "ffn_sizes", "ffn_weights",
    "is_reconfigured", "learner_indices", "merge", "node_scores",
    "num_learners", "random_learners", "reconfigure", "select_learners",
]
