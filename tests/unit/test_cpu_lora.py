"""The CPU LoRA fix (actors.engines.vllm.cpu_lora) against vLLM's own torch op: rows without an adapter (index -1)
get a zero LoRA product, rows with one get exactly what vLLM computes."""

import pytest

torch = pytest.importorskip("torch")
lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from actors.engines.vllm.cpu_lora import _masked_shrink  # noqa: E402


def test_masked_shrink_zeroes_rows_without_an_adapter_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen)
    weights = torch.randn(3, 1, 4, 16, generator=gen)  # 3 adapters, rank 4, as vLLM stacks them
    indices = torch.tensor([0, -1, 2, -1, 1])
    ours = torch.full((5, 6), 7.0)  # wider than the rank: columns past it are not shrink's to write
    theirs = ours.clone()
    # vLLM's own op, also where an engine in this process has already applied the patch
    original = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    _masked_shrink(original)(x, weights, ours, indices, 0.5)
    original(x, weights, theirs, indices, 0.5)
    adapter_rows, base_rows = indices >= 0, indices < 0
    assert torch.equal(ours[adapter_rows], theirs[adapter_rows])
    assert torch.all(ours[base_rows, :4] == 0) and torch.all(ours[:, 4:] == 7.0)
    assert not torch.all(theirs[base_rows, :4] == 0)  # vLLM's own op applies the last adapter there
