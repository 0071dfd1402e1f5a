"""Fixes to transformers' Phi4Multimodal code that the transformers backend applies when it loads a model.

``unfold_tensor`` (transformers 5.17-5.19, ``modeling_phi4_multimodal``) cuts an audio batch's encoder
input into windows of 500 frames (40 s of audio) when the batch's longest clip is longer than that. It
ends with ``permute(...).view(...)``, which only works when the batch holds one clip or the clip fits in
one window: a batch of two or more rows with a clip over 40 s fails with "view size is not compatible
with input tensor's size and stride". Seen on the H200 (bench/gpu.py, 5-60 s speech): every such batch
failed and ran its rows one at a time. ``reshape`` gives the same elements in the same order, copying
only where a view cannot. Imports torch and transformers: load it only in the GPU actor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unfold_tensor(tensor: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """(N, T, D) -> (N * T // max_seq_len, max_seq_len, D): each clip's windows in order, clip by clip."""
    _, _, dim = tensor.shape
    tensor = tensor.transpose(-1, -2)
    tensor = F.unfold(tensor[..., None, :], kernel_size=(1, max_seq_len), stride=(1, max_seq_len))
    batch, _, windows = tensor.shape
    tensor = tensor.view(batch, -1, max_seq_len, windows).permute(0, 3, 2, 1)
    return tensor.reshape(-1, max_seq_len, dim).contiguous()


def apply() -> None:
    """Patch the modeling module in place (idempotent); its audio encoder looks the function up there."""
    from transformers.models.phi4_multimodal import modeling_phi4_multimodal as modeling

    modeling.unfold_tensor = unfold_tensor
