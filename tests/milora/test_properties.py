"""Property tests: a MiLoRA model's routers and experts equal the float64 references of ``reference.py``
for any block shape, rank, top-k, pooler, activation, router input, DoRA or not, dtype, batch and
padding Hypothesis comes up with.

Each case builds a real tiny ``LlamaForCausalLM`` from a drawn config, wraps it with a random
(``init_weights=False``) MiLoRA adapter, runs one padded batch, and checks every block's router
(probabilities and top-k gates, Eq. 2-3) and every expert's output row by row (gated LoRA / DoRA
update), from the tensors each module actually received.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from loramix import MiLoRAConfig
from tests.milora.common import experts, latest, router_params, routers, watch
from tests.milora.reference import expert_reference, router_reference
from tests.milora.test_routing import capture_inputs, capture_router_inputs, record
from tests.tiny_models import tiny_llama

# Router probabilities are float32 whatever the model dtype; expert outputs are compared relative to the
# size of their summands, to the resolution of the model's dtype (the reference is float64 on the same
# rounded inputs and weights).
PROB_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
OUT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    lengths = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    return dict(
        hidden=heads * draw(st.sampled_from([2, 4, 6])),
        heads=heads,
        intermediate=draw(st.integers(4, 40)),
        blocks=draw(st.integers(1, 2)),
        r=draw(st.integers(1, 8)),
        top_k=draw(st.integers(1, 7)),
        pooler=draw(st.sampled_from(["attention", "mean", "last", "max"])),
        activation=draw(st.sampled_from(["rational", "gelu", "relu", "identity"])),
        router_input=draw(st.sampled_from(["normalized", "residual"])),
        use_dora=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        lengths=lengths,
        left=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def padded_batch(lengths, left, seed):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = torch.randint(1, 128, (n,), generator=generator)
        mask[row, span] = 1
    return ids, mask


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_model_routers_and_experts_equal_reference(case):
    base = tiny_llama(
        case["seed"],
        hidden_size=case["hidden"],
        intermediate_size=case["intermediate"],
        num_hidden_layers=case["blocks"],
        num_attention_heads=case["heads"],
        num_key_value_heads=case["heads"],
        initializer_range=0.3,
    )
    config = MiLoRAConfig(
        r=case["r"], lora_alpha=2 * case["r"], top_k=case["top_k"], pooler=case["pooler"],
        activation=case["activation"], router_input=case["router_input"], use_dora=case["use_dora"],
        lora_dropout=0.0, init_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = watch(get_peft_model(base, config).to(case["dtype"]).eval())
    dtype = case["dtype"]
    ids, mask = padded_batch(case["lengths"], case["left"], case["seed"])

    seen_router, handles = capture_router_inputs(model)
    seen_in, more = capture_inputs(experts(model))
    outputs = {}
    handles += more + [
        e.register_forward_hook(lambda m, a, o, n=n: record(outputs, n, o)) for n, e in experts(model).items()
    ]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()
    assert torch.isfinite(logits[mask.bool()]).all()

    assert len(routers(model)) == case["blocks"] and len(experts(model)) == 7 * case["blocks"]
    gates_of = {}
    for name, router in routers(model).items():
        params = router_params(router)
        probs, gates = router_reference(
            seen_router[case["router_input"]][name], mask, case["pooler"], params.get("milora_pool_query"),
            case["activation"], params["milora_router"], case["top_k"],
            params.get("milora_rational_num"), params.get("milora_rational_den"),
        )  # fmt: skip
        state = latest(model, name)
        assert state.probs.dtype == torch.float32
        assert torch.allclose(state.probs.double(), probs, atol=PROB_TOLERANCE[dtype]), case
        # The top-k choice is only defined up to rounding when the k-th and (k+1)-th probabilities nearly tie.
        ordered = probs.sort(dim=-1, descending=True).values
        if case["top_k"] < probs.shape[-1]:
            assume(
                bool(((ordered[:, case["top_k"] - 1] - ordered[:, case["top_k"]]) > 4 * PROB_TOLERANCE[dtype]).all())
            )
        assert torch.equal(state.selected, gates > 0), case
        assert torch.allclose((state.probs * state.selected).double(), gates, atol=PROB_TOLERANCE[dtype]), case
        gates_of[name.rsplit(".", 1)[0]] = state.probs * state.selected

    for name, expert in experts(model).items():
        block = next(b for b in gates_of if name.startswith(b + "."))
        base_layer = expert.get_base_layer()
        index = expert.expert_index["default"]
        magnitude = expert.milora_magnitude["default"].detach() if case["use_dora"] else None
        for row in range(ids.shape[0]):
            x = seen_in[name][row]
            expected = expert_reference(
                x, base_layer.weight.double(), base_layer.bias, expert.milora_A["default"].detach(),
                expert.milora_B["default"].detach(), expert.scaling["default"], float(gates_of[block][row, index]),
                magnitude,
            )  # fmt: skip
            base_part = x.double() @ base_layer.weight.double().T
            scale = base_part.norm() + (expected - base_part).norm()
            error = (outputs[name][row].double() - expected).norm() / scale.clamp_min(1e-12)
            assert error < OUT_TOLERANCE[dtype], (name, row, error.item(), case)
