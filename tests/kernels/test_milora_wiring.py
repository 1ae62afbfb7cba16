"""MiLoRA inference through the segmented-LoRA Triton kernel (interpreter) equals its PyTorch path."""

from __future__ import annotations

import torch

from loramix import kernels
from tests.milora.common import latest, left_pad, milora_model, routers


def test_milora_inference_with_triton_matches_pytorch():
    model = milora_model(seed=3, r=4, top_k=2).eval()
    ids = torch.randint(1, 128, (5, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kernels.backend("torch"):
        expected = model(input_ids=ids).logits
    selected = torch.stack([latest(model, n).selected for n in routers(model)])  # (blocks, B, N)
    partial = (selected.any(dim=1) & ~selected.all(dim=1)).any()
    assert partial, "no expert was chosen by only some of the prompts: the gathered path is not exercised"
    with torch.no_grad(), kernels.backend("triton"):
        actual = model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    with kernels.backend("torch"):
        tokens = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with kernels.backend("triton"):
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0), tokens)


def test_training_forward_keeps_the_pytorch_path():
    """With gradients enabled the kernel (inference only) must not be used, whatever the backend."""
    model = milora_model(seed=1).train()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    with kernels.backend("triton"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "milora_A" in n)


def test_mixed_adapter_batch_with_triton_matches_pytorch(tmp_path):
    """A batch over several MiLoRA adapters takes the grouped kernel (one launch pair per expert layer)."""
    from tests.test_mixed_batch import NAMES, prompts, tenants

    model = tenants(tmp_path, "milora")
    ids, mask = left_pad(prompts(5))
    calls = []
    original = kernels.grouped_lora

    def spy(*args, **kwargs):
        calls.append(args[4].numel())  # the adapters of the launch
        return original(*args, **kwargs)

    kwargs = {"input_ids": ids, "attention_mask": mask, "adapter_names": NAMES}
    with torch.no_grad(), kernels.backend("torch"):
        expected = model(**kwargs).logits
        tokens = model.generate(**kwargs, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), kernels.backend("triton"):
        kernels.grouped_lora = spy
        try:
            actual = model(**kwargs).logits
            assert calls and max(calls) > 1  # several adapters in one launch
            assert torch.equal(model.generate(**kwargs, max_new_tokens=3, do_sample=False), tokens)
        finally:
            kernels.grouped_lora = original
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
