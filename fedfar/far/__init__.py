"""FAR (Freeze And Reconfigure, Vucetic et al., ISCAS 2022) in plain torch + transformers, no Flower."""
from .arch import ARCHITECTURES, Layout, blocks, layout_of
from .layer import PREACT_STORAGE, SplitFFN
from .model import (
    ffn_sizes,
    ffn_weights,
    is_reconfigured,
    learner_indices,
    learners_to_masks,
    masks_to_learners,
    merge,
    node_scores,
    num_learners,
    random_learners,
    reconfigure,
    select_learners,
)
from .policy import METHODS, POLICIES, MethodSpec, Policy, apply_bitfit, apply_policy, get_policy

__all__ = [
    "ARCHITECTURES", "Layout", "blocks", "layout_of", "PREACT_STORAGE", "SplitFFN", "ffn_sizes", "ffn_weights",
    "is_reconfigured", "learner_indices", "learners_to_masks", "masks_to_learners", "merge", "node_scores",
    "num_learners", "random_learners", "reconfigure", "select_learners", "METHODS", "POLICIES", "MethodSpec",
    "Policy", "apply_bitfit", "apply_policy", "get_policy",
]
