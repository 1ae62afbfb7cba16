"""Property tests: a MiLoRA model's routers and experts equal the float64 references of ``reference.py``
for any block shape, rank, top-k, pooler, activation, router input, DoRA or not, dtype, batch and
padding Hypothesis comes up with.

Each case builds a real tiny ``LlamaForCausalLM`` from a drawn config, wraps it with a random
(``init_weights=False``) MiLoRA adapter, runs one padded batch, and checks every block's router
(probabilities and top-k gates, Eq. 2-3) and every expert's output row by row (gated LoRA / DoRA
update), from the tensors each module actually received.

Tolerances are forward error bounds of each computation in the precision it runs in
(:func:`router_error_bound`, :func:`expert_error_bound`): what rounding can explain given the sizes reduced
over and the magnitudes of the operands, element by element. Anything more is a bug.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from loramix import MiLoRAConfig
from loramix.milora.functional import GATE_FORMS
from tests.milora.common import experts, latest, router_params, routers, watch
from tests.milora.reference import expert_reference, pool_reference, rational_reference, router_reference
from tests.milora.test_routing import capture_inputs, capture_router_inputs, record
from tests.mor.test_properties import gamma, unit_roundoff
from tests.tiny_models import tiny_llama

D = torch.float64
U32 = unit_roundoff(torch.float32)
GELU_LIPSCHITZ = 1.13  # max |GeLU'(x)| = 1.1289 (at x = ±sqrt(2))


def router_error_bound(hidden, mask, pooler, query, activation, weight, numerator=None, denominator=None):
    """Per prompt and expert (B, N), how far the router's float32 probabilities may be from the exact ones.

    ``loramix.milora.functional.route`` runs in float32 whatever the model dtype, on the block inputs (already
    rounded to the model dtype: the reference gets the same tensors), so u = u32 throughout. Magnitudes |·| are
    element-wise, in float64, h_t the block inputs of the T tokens of a row, d the hidden size, N the experts::

        pool    mean: |δh| <= γ_(T+1) mean_t |h_t|      (T-term masked sum, divide)     max, last: exact
                attention: scores off by ≤ λ_s = γ_d max_t (|h_t|·|q|), so the weights a_t by a factor in
                e^(±2λ_s), and by softmax's T + 4 roundings; then a T-term sum:
                |δh| <= [(1 + expm1(2λ_s) + γ_(T+4) e^(2λ_s))(1 + γ_T) - 1] Σ_t a_t |h_t|
        g       |δg| <= L_g |δh| + (rounding of g itself):  identity, relu: L = 1, exact;
                gelu: L = 1.13, ≤ γ_6 |h| (x/√2, erf ≤ 2 ulp, 1 +, · x);
                rational P/(1 + |Q|) by Horner: L = |g'(h)| (float64 autograd, first order),
                ≤ γ_(2m+2n+2) (Σ|a_j||h|^j + |g| (1 + |Q| + Σ|b_i||h|^i)) / (1 + |Q|)   (Higham eq. 5.3)
        logits  |δl_j| <= γ_d (|W_r| |g|)_j + (|W_r| |δg|)_j,   λ = max_j |δl_j|
        softmax |δp_i| <= p_i (expm1(2λ) + γ_(N+4) e^(2λ))      (softmax moves by a factor in e^(±2λ); max,
                                                                  exp ≤ 2 ulp, N - 1 sums, reciprocal, product)

    Worst case (constant c = 1; Higham, Accuracy and Stability of Numerical Algorithms, §3.1 and eq. 3.5),
    linear in T, d and N; first order only where marked. Measured on 350 random models: at most 0.5 of it,
    typically 10-100x below. The model dtype does not enter: the router sees the same rounded inputs as the
    reference and computes in float32.
    """
    d, n = hidden.shape[-1], weight.shape[0]
    h = hidden.to(D)
    keep = mask.bool()
    width = h.shape[1]
    abs_h = h.abs() * keep.unsqueeze(-1)
    pooled = pool_reference(hidden, mask, pooler, query)  # (B, d)
    if pooler == "mean":
        pool_error = gamma(width + 1, U32) * abs_h.sum(1) / keep.sum(1, keepdim=True)
    elif pooler == "attention":
        q = query.to(D)
        scores = (h * q).sum(-1).masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, T)
        lam_s = gamma(d, U32) * ((h.abs() @ q.abs()) * keep).amax(-1, keepdim=True)
        rho_a = torch.expm1(2 * lam_s) + gamma(width + 4, U32) * torch.exp(2 * lam_s)
        pool_error = ((1 + rho_a) * (1 + gamma(width, U32)) - 1) * (weights.unsqueeze(-1) * abs_h).sum(1)
    else:
        pool_error = torch.zeros_like(pooled)
    if activation == "rational":
        x = pooled.clone().requires_grad_(True)
        g = rational_reference(x, numerator, denominator)
        (slope,) = torch.autograd.grad(g.sum(), x)
        g, x = g.detach(), x.detach()
        a, b = numerator.to(D).abs(), denominator.to(D).abs()
        p_abs = sum(a[j] * x.abs() ** j for j in range(len(a)))
        q_abs = sum(b[i] * x.abs() ** (i + 1) for i in range(len(b)))
        q = sum(float(b_i) * x ** (i + 1) for i, b_i in enumerate(denominator.to(D)))
        denominator_value = 1 + q.abs()
        order = 2 * (len(a) - 1) + 2 * len(b) + 2
        act_error = (
            slope.abs() * pool_error
            + gamma(order, U32) * (p_abs + g.abs() * (denominator_value + q_abs)) / denominator_value
        )
    elif activation == "gelu":
        g = 0.5 * pooled * (1 + torch.erf(pooled / 2**0.5))
        act_error = GELU_LIPSCHITZ * pool_error + gamma(6, U32) * pooled.abs()
    else:
        g = pooled.clamp_min(0) if activation == "relu" else pooled
        act_error = pool_error
    abs_w = weight.to(D).abs()
    lam = (gamma(d, U32) * g.abs() @ abs_w.T + act_error @ abs_w.T).amax(-1, keepdim=True)
    probs = torch.softmax(g @ weight.to(D).T, dim=-1)
    return probs * (torch.expm1(2 * lam) + gamma(n + 4, U32) * torch.exp(2 * lam))


def expert_error_bound(x, weight, bias, lora_A, lora_B, scaling, gate, magnitude, dtype):
    """Per output element of one row (T, d_out), how far the expert layer computed in ``dtype`` may be from
    :func:`expert_reference` on the same inputs (x, weights, magnitude rounded to ``dtype``; the gate ``g`` is the
    model's own float32 value).

    The layer computes ``o = fl(W x + b) + fl(fl(g·s) · fl(B fl(A x)))`` (LoRA) or, for DoRA,
    ``o = fl(W x + b) + fl(g · fl((σ - 1) ⊙ plain + σ ⊙ s B A x))`` with ``σ = m / ||W + s B A||`` (row norms
    computed in ``dtype``) and ``plain = fl(W x + b) - b``. With u the unit roundoff of ``dtype``::

        |o - o_exact| <= γ_(d_in+2) M_b + |g| [γ_K (|σ - 1| M_b + |σ| M_L) + ρ (1 + γ_K) |σ| (M_b + M_L)] + floor
        M_b = |W||x| + |b|,   M_L = s |B| (|A| |x|),   K = d_in + r + 6   (LoRA: σ = 1, ρ = 0)
        ρ   = relative error of σ: the norm of the computed W + s B A (r + 2 roundings per entry) is off by
              ≤ γ_(r+2) ||C||, C = |W| + s |B||A|, and its own d_in + 1 roundings (squares, sum, sqrt) add
              γ_(d_in+1) of it: ρ = (1 + u) / (1 - γ_(d_in+r+4) ||C|| / ||W + s B A||) - 1
        floor = gradual underflow (float16 only in practice): ≤ K roundings per path may be off by η = u · tiny
              absolutely, amplified by at most 1 + |g| (1 + |σ| + |σ - 1| + |σ| s Σ_k |B_ok|) + |σ - 1| M_b + |σ| M_L

    Worst case, constant c = 1 (Higham §3.1, eq. 3.5, Lemma 3.3), linear in d_in and r. Measured on 350 random
    models: at most 0.53 of it (d_in = 2, r = 1), typically 5-50x below.
    """
    u = unit_roundoff(dtype)
    d_in, r = x.shape[-1], lora_A.shape[0]
    ax, abs_w, abs_A, abs_B = x.to(D).abs(), weight.to(D).abs(), lora_A.to(D).abs(), lora_B.to(D).abs()
    m_b = ax @ abs_w.T + (0.0 if bias is None else bias.to(D).abs())
    m_l = scaling * (ax @ abs_A.T) @ abs_B.T
    k = d_in + r + 6
    if magnitude is None:
        sigma, rho = torch.ones(weight.shape[0], dtype=D), 0.0
    else:
        adapted = weight.to(D) + scaling * (lora_B.to(D) @ lora_A.to(D))
        norm = adapted.norm(dim=1)
        sigma = magnitude.to(D) / norm
        c_norm = (abs_w + scaling * abs_B @ abs_A).norm(dim=1)
        # (no bound at all when the norm's error bound reaches the norm itself: a huge ρ, finite so that 0 · ρ = 0)
        rho = (1 + u) / (1 - gamma(d_in + r + 4, u) * c_norm / norm).clamp_min(1e-300) - 1
    gate = abs(gate)
    bound = gamma(d_in + 2, u) * m_b + gate * (
        gamma(k, u) * ((sigma - 1).abs() * m_b + sigma.abs() * m_l)
        + rho * (1 + gamma(k, u)) * sigma.abs() * (m_b + m_l)
    )
    eta = u * torch.finfo(dtype).tiny
    amplification = 1 + gate * (1 + sigma.abs() + (sigma - 1).abs() + sigma.abs() * scaling * abs_B.sum(1))
    amplification = amplification + (sigma - 1).abs() * m_b + sigma.abs() * m_l
    return bound + k * eta * amplification


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
        gate_form=draw(st.sampled_from(GATE_FORMS)),
        pooler=draw(st.sampled_from(["attention", "mean", "last", "max"])),
        activation=draw(st.sampled_from(["rational", "gelu", "relu", "identity"])),
        router_input=draw(st.sampled_from(["normalized", "residual"])),
        use_dora=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        lengths=lengths,
        left=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def gates_error_bound(probs, bound, selected, gate_form, top_k):
    """How far the float32 gates may be from the exact ones, from the probabilities' bound ``bound`` (B, N).

    'probability': the selected p_i themselves. Otherwise w_i = c p_i / S with S the sum of the k selected p_j and
    c = k ('unit_mean') or 1. With |δp_i| <= b_i and |δS| <= Σ_selected b_j = σ < S, exactly
    |c (p_i + δp_i) / (S + δS) - c p_i / S| = c |S δp_i - p_i δS| / (S (S + δS)) <= c (b_i S + p_i σ) / (S (S - σ)),
    plus the float32 roundings of the k - 1 sums, the division and the product (γ_(k+2) of the computed |w_i|).
    """
    selected = selected.to(D)
    if gate_form == "probability":
        return bound * selected
    c = top_k if gate_form == "unit_mean" else 1
    total = (probs * selected).sum(-1, keepdim=True)
    spread = (bound * selected).sum(-1, keepdim=True)
    error = c * (bound * total + probs * spread) / (total * (total - spread)) * selected
    return error + gamma(top_k + 2, U32) * (c * probs * selected / total + error)


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


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
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
        gate_form=case["gate_form"], lora_dropout=0.0, init_weights=False, task_type="CAUSAL_LM",
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
            params.get("milora_rational_num"), params.get("milora_rational_den"), case["gate_form"],
        )  # fmt: skip
        bound = router_error_bound(
            seen_router[case["router_input"]][name], mask, case["pooler"], params.get("milora_pool_query"),
            case["activation"], params["milora_router"], params.get("milora_rational_num"),
            params.get("milora_rational_den"),
        )  # fmt: skip
        state = latest(model, name)
        assert state.probs.dtype == torch.float32, (state.probs.dtype, case)
        error = (state.probs.double() - probs).abs()
        assert (error <= bound).all(), (name, "probs", error.max().item(), bound.flatten()[error.argmax()].item(), case)
        # The top-k choice is only defined up to rounding when the k-th and (k+1)-th probabilities are closer than
        # their two error bounds; apart by more, the computed order is the exact one.
        order = probs.argsort(dim=-1, descending=True)
        if case["top_k"] < probs.shape[-1]:
            kth, next_ = order[:, case["top_k"] - 1 : case["top_k"]], order[:, case["top_k"] : case["top_k"] + 1]
            gap = probs.gather(-1, kth) - probs.gather(-1, next_)
            assume(bool((gap > bound.gather(-1, kth) + bound.gather(-1, next_)).all()))
        assert torch.equal(state.selected, gates > 0), (name, state.selected, gates, case)
        error = (state.gates.double() - gates).abs()
        gate_bound = gates_error_bound(probs, bound, state.selected, case["gate_form"], case["top_k"])
        assert (error <= gate_bound).all(), (name, "gates", error.max().item(), case)
        gates_of[name.rsplit(".", 1)[0]] = state.gates  # the very gates the experts used

    for name, expert in experts(model).items():
        block = next(b for b in gates_of if name.startswith(b + "."))
        base_layer = expert.get_base_layer()
        index = expert.expert_index["default"]
        magnitude = expert.milora_magnitude["default"].detach() if case["use_dora"] else None
        lora_A, lora_B = expert.milora_A["default"].detach(), expert.milora_B["default"].detach()
        weight, scaling = base_layer.weight.detach(), expert.scaling["default"]
        for row in range(ids.shape[0]):
            x = seen_in[name][row]
            args = (x, weight, base_layer.bias, lora_A, lora_B, scaling, float(gates_of[block][row, index]), magnitude)
            expected = expert_reference(*args)
            bound = expert_error_bound(*args, dtype)
            error = (outputs[name][row].double() - expected).abs()
            worst = int((error / bound).argmax())
            assert (error <= bound).all(), (
                f"{name} row {row}: {int((error > bound).sum())} of {error.numel()} outputs beyond the rounding "
                f"bound; worst: error {error.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}; "
                f"{case}"
            )
