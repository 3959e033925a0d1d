"""`awq-edge quantize --device cuda`: the quantizer on a GPU does what it does on the CPU (pytest -m gpu).

A tiny random Llama and random calibration tokens (no tokenizer, no text: the machine lent for GPU
checks has neither SmolLM2 nor the data cache). Quantized once on the CPU and once on the GPU;
both quantized models must be as close to the float one, judged by their logits. Grid searches
may break near-ties differently on the two devices, so the test compares quality, not bits.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA GPU: quantizer-on-GPU test skipped", allow_module_level=True)

from awq_edge.families import family_for  # noqa: E402
from awq_edge.quantize import QuantizeSettings, quantize_model  # noqa: E402


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms, so folding scales into them is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75)
    return model


def quantized(model, tokens, device: str, method: str = "awq"):
    """A copy of model with every linear replaced by its dequantized INT4 weights (on the CPU)."""
    model = copy.deepcopy(model)
    settings = QuantizeSettings(method=method, group_size=32, calib_samples=len(tokens),
                                calib_seqlen=tokens.shape[1], loss_samples=4, scale_grid=10, clip_grid=5,
                                device=device)
    result = quantize_model(model, family_for("llama"), tokens, settings, progress=False)
    model.to("cpu")
    with torch.no_grad():
        for name, lin in result.linears.items():
            model.get_submodule(name).weight = torch.nn.Parameter(torch.from_numpy(lin.dequantize()))
    return model


@torch.no_grad()
def test_quantize_on_cuda_is_as_good_as_on_cpu():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (8, 64), generator=g)
    held_out = torch.randint(0, 512, (4, 64), generator=g)
    want = model(held_out).logits

    def error(m):
        return float((m(held_out).logits - want).pow(2).mean() / want.pow(2).mean())

    err_cpu, err_cuda = error(quantized(model, tokens, "cpu")), error(quantized(model, tokens, "cuda"))
    err_rtn = error(quantized(model, tokens, "cpu", method="rtn"))
    assert err_cpu < err_rtn, (err_cpu, err_rtn)  # AWQ is doing something on this model
    assert err_cuda < 1.2 * err_cpu, (err_cuda, err_cpu)
