"""Linear probes on self-attention activations: apply, save, load, and import the paper's checkpoints.

A probe bank holds, for one task, one linear map per (site, step) from the C channels of each
token to K outputs: K=2 logits (background, foreground) for ``"foreground"`` as in the paper, one
value for ``"depth"`` and ``"shading"``. Applied to a site's conditional activation ``[B, T, C]``
it gives ``[B, K, h, w]``, the tokens laid out row-major on the site's grid (the UNet's own
``[B, C, h, w] -> [B, h*w, C]`` flattening, and the paper's ``view(-1, h, w, K)``).

On disk a bank is one safetensors file (tensors ``"<site>.step<NN>.weight"`` [K, C] and optional
``".bias"`` [K]; ``__metadata__["ldm_scene"]`` is the JSON of :class:`ProbeMeta`). Loading never
unpickles: a file that is not safetensors, or whose metadata does not fit the model it is meant
for, is refused with a :class:`ProbeError` that names the file and says what differs. The paper's
released ``torch.save`` checkpoints are read by :func:`import_paper_checkpoints` with
``torch.load(weights_only=True)`` only.

A :class:`GroupProbe` (``foreground_group.safetensors``) reads the foreground from several sites
together, one linear map per step over their concatenated channels.
"""
from __future__ import annotations

from .bank import ProbeBank, class_means_bank
from .directory import CLASS_MEANS, load_probe_dir, probe_path
from .group import GROUP_FILE, GroupProbe, group_tokens
from .meta import (
    DEPTH_MEAN,
    DEPTH_STD,
    FORMAT_VERSION,
    METADATA_KEY,
    TASKS,
    ProbeError,
    ProbeMeta,
    parse_tensor_name,
    task_outputs,
    tensor_name,
)
from .paper import PAPER_SITE_NAMES, import_paper_checkpoints, paper_checkpoint_path

__all__ = [
    "TASKS",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "DEPTH_MEAN",
    "DEPTH_STD",
    "ProbeError",
    "ProbeMeta",
    "ProbeBank",
    "task_outputs",
    "tensor_name",
    "parse_tensor_name",
    "probe_path",
    "load_probe_dir",
    "CLASS_MEANS",
    "PAPER_SITE_NAMES",
    "paper_checkpoint_path",
    "import_paper_checkpoints",
    "class_means_bank",
    "GroupProbe",
    "GROUP_FILE",
    "group_tokens",
]
