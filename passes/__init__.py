"""Graph passes over torch.fx GraphModules (installed as ``nmcompile.passes``).

Each pass is a function ``GraphModule -> PassResult(graph_module, modified)``; one pass a file.
The order in ``nmcompile.compile`` is::

    trace -> find_sites -> insert_masks -> (method rounds rewrite masks) -> finalize [-> fold BN]

``check_nm`` is the N:M invariant tests and ``debug=True`` run after each pass.
"""

from __future__ import annotations

from ._infra import PassResult, fingerprint, run_passes
from .channel_graph import ChannelGraph, ChannelSpace, build_channel_graph
from .check_nm import NMCheckEntry, NMCheckReport, check_nm, nm_invariant
from .finalize import finalize, fold_batchnorm
from .find_sites import (
    ExcludedLayer,
    NMCompileWarning,
    PrunableSite,
    find_sites,
    get_excluded,
    get_sites,
)
from .insert_masks import MaskedCall, get_masks, insert_masks, masked_calls
from .shrink_channels import ShrinkReport, shrink_channels
from .trace import propagate_shapes, trace

__all__ = [
    "ChannelGraph",
    "ChannelSpace",
    "ExcludedLayer",
    "MaskedCall",
    "NMCheckEntry",
    "NMCheckReport",
    "NMCompileWarning",
    "PassResult",
    "PrunableSite",
    "ShrinkReport",
    "build_channel_graph",
    "check_nm",
    "finalize",
    "find_sites",
    "fingerprint",
    "fold_batchnorm",
    "get_excluded",
    "get_masks",
    "get_sites",
    "insert_masks",
    "masked_calls",
    "nm_invariant",
    "propagate_shapes",
    "run_passes",
    "shrink_channels",
    "trace",
]
