"""When and on which tokens MiLoRA routes: reference router, padding, prompt-only pools, KV-cache reuse."""

from __future__ import annotations

import functools

import pytest
import torch

from loramix.milora.layer import MiLoRARouter
from loramix.routing.session import build_pool_mask
from tests.milora.common import (
    CACHE,
    experts,
    latest,
    left_pad,
    logits,
    milora_model,
    probabilities,
    random_tokens,
    right_pad,
    router_params,
    routers,
    selections,
)
from tests.milora.reference import expert_reference, router_reference
from tests.tiny_models import tiny_llama


def record(store, name, value) -> None:
    """Keep the first value seen under ``name`` (returns None: a hook must not replace inputs or outputs)."""
    store.setdefault(name, value.detach())


def capture_inputs(modules):
    """Record the first positional input of each module."""
    seen, handles = {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: record(seen, name, args[0])))
    return seen, handles


def capture_router_inputs(model):
    """What each router pools: its block's input hidden states, after (normalized) or before (residual) the norm."""
    seen, handles = {"normalized": {}, "residual": {}}, []

    def hook(module, args, output, name):
        record(seen["residual"], name, args[0])
        record(seen["normalized"], name, output)

    for name, router in routers(model).items():
        handles.append(router.register_forward_hook(functools.partial(hook, name=name)))
    return seen, handles


@pytest.mark.parametrize(
    "pooler, router_input",
    [("attention", "normalized"), ("mean", "normalized"), ("last", "residual"), ("max", "residual")],
)
@pytest.mark.parametrize("gate_form", ["unit_mean", "probability"])
def test_routers_of_a_real_model_match_the_reference(pooler, router_input, gate_form):
    model = milora_model(pooler=pooler, router_input=router_input, gate_form=gate_form).eval()
    ids, mask = left_pad([random_tokens(9, 1), random_tokens(5, 2), random_tokens(7, 3)])
    seen, handles = capture_router_inputs(model)
    logits(model, input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    for name, router in routers(model).items():
        params = router_params(router)
        probs, gates = router_reference(
            seen[router_input][name], mask, pooler, params.get("milora_pool_query"), "rational",
            params["milora_router"], 2, params["milora_rational_num"], params["milora_rational_den"], gate_form,
        )  # fmt: skip
        state = latest(model, name)
        assert torch.allclose(state.probs.double(), probs, atol=1e-5)
        assert torch.equal(state.selected, gates > 0)
        assert torch.allclose(state.gates.double(), gates, atol=1e-5)
    assert not torch.allclose(seen["normalized"][name], seen["residual"][name])  # the choice matters


@pytest.mark.parametrize(
    "use_dora, gate_form",
    [(False, "probability"), (True, "probability"), (False, "normalized"), (False, "unit_mean"), (True, "unit_mean")],
)
def test_experts_add_their_gated_update_to_the_selected_rows_only(use_dora, gate_form):
    model = milora_model(use_dora=use_dora, gate_form=gate_form).eval()
    ids, mask = right_pad([random_tokens(6, 4), random_tokens(6, 5), random_tokens(4, 6), random_tokens(5, 7)])
    layer_experts = {n: e for n, e in experts(model).items() if ".layers.1." in n}
    seen, handles = capture_inputs(layer_experts)
    outputs = {}
    handles += [e.register_forward_hook(lambda m, a, o, n=n: record(outputs, n, o)) for n, e in layer_experts.items()]
    logits(model, input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    state = latest(model, "base_model.model.model.layers.1.input_layernorm")
    gates = state.probs * state.selected
    if gate_form != "probability":  # MiLoRAConfig.gate_form: the selected weights sum to 1, or to top_k
        gates = (
            gates
            / gates.sum(-1, keepdim=True)
            * (model.peft_config["default"].top_k if gate_form == "unit_mean" else 1)
        )
    assert 0 < int((gates > 0).any(0).sum()) and bool((gates > 0).sum(0).lt(4).any())  # some experts for some rows
    for name, expert in layer_experts.items():
        base = expert.get_base_layer()
        index = expert.expert_index["default"]
        magnitude = expert.milora_magnitude["default"].detach() if use_dora else None
        for row in range(ids.shape[0]):
            expected = expert_reference(
                seen[name][row], base.weight, base.bias, expert.milora_A["default"].detach(),
                expert.milora_B["default"].detach(), expert.scaling["default"], float(gates[row, index]), magnitude,
            )  # fmt: skip
            assert torch.allclose(outputs[name][row].double(), expected, atol=1e-5), (name, row)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_each_sequence_of_a_padded_batch_is_routed_and_computed_as_alone(pad):
    model = milora_model().eval()
    sequences = [random_tokens(9, 1), random_tokens(4, 2), random_tokens(7, 3)]
    ids, mask = (left_pad if pad == "left" else right_pad)(sequences)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes with left padding
    batch_logits = logits(model, input_ids=ids, attention_mask=mask, position_ids=position_ids)
    batch_routing = selections(model)
    batch_probs = probabilities(model)
    assert any(len({tuple(s.tolist()) for s in sel}) > 1 for sel in batch_routing.values())  # rows differ
    for row, sequence in enumerate(sequences):
        alone = logits(model, input_ids=sequence.unsqueeze(0))[0]
        positions = mask[row].bool()
        assert torch.allclose(batch_logits[row, positions], alone, atol=1e-5)
        for name, selected in selections(model).items():
            assert torch.equal(batch_routing[name][row], selected[0])
            assert torch.allclose(batch_probs[name][row], probabilities(model)[name][0], atol=1e-6)


def greedy_without_cache(model, input_ids, attention_mask, steps):
    """Recompute the whole sequence at every step, with the routers pooling over the prompt only."""
    prompt_length = input_ids.shape[1]
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        prompt_mask = torch.zeros_like(ids)
        prompt_mask[:, :prompt_length] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        step_logits = logits(
            model,
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            prompt_mask=prompt_mask,
            use_cache=False,
        )
        ids = torch.cat([ids, step_logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_greedy_generate_with_cache_equals_recomputation_routed_on_the_prompt():
    model = milora_model().eval()
    ids, mask = left_pad([random_tokens(7, 11), random_tokens(4, 12)])
    with_cache = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(with_cache, greedy_without_cache(model, ids, mask, 20))
    without_cache = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=False
    )
    assert torch.equal(without_cache, with_cache)


def count_routes(monkeypatch) -> dict[int, int]:
    """Calls of ``MiLoRARouter.route`` per router (by id), counted from now on."""
    calls: dict[int, int] = {}
    original = MiLoRARouter.route

    def counted(self, *args, **kwargs):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MiLoRARouter, "route", counted)
    return calls


def test_router_runs_once_per_block_per_prompt(monkeypatch):
    model = milora_model().eval()
    calls = count_routes(monkeypatch)
    blocks = [id(r) for r in routers(model).values()]
    prompt = random_tokens((1, 6), 3)
    tokens = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
    )
    assert tokens.shape[1] == 6 + 20 and calls == {b: 1 for b in blocks}  # 20 tokens, one routing per block
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert calls == {b: 2 for b in blocks}  # a new generate call routes again
    with torch.no_grad():
        out = model(input_ids=prompt)  # a forward without cache routes
        assert calls == {b: 3 for b in blocks}
        model(input_ids=tokens[:, 6:7], **{CACHE: out[CACHE]})  # continuing that cache reuses it
        assert calls == {b: 3 for b in blocks}
        model(input_ids=tokens[:, 6:8], use_cache=False)  # a new forward without cache routes again
        assert calls == {b: 4 for b in blocks}


def test_each_cache_keeps_the_routing_of_its_own_prompt():
    """Two conversations decoded in turns: each continuation uses the routing of its own prompt."""
    model = milora_model().eval()
    prompts = [random_tokens((1, 5), 1), random_tokens((1, 7), 2)]
    nxt = [random_tokens((1, 1), 3), random_tokens((1, 1), 4)]
    with torch.no_grad():
        caches = [model(input_ids=p)[CACHE] for p in prompts]
        for prompt, token, cache in zip(prompts, nxt, caches, strict=True):
            continued = model(input_ids=token, **{CACHE: cache}).logits[:, -1]
            full = torch.cat([prompt, token], dim=1)
            prompt_mask = torch.ones_like(full)
            prompt_mask[:, -1] = 0  # the reference routes on the prompt alone, with no cache
            expected = model(input_ids=full, prompt_mask=prompt_mask, use_cache=False).logits[:, -1]
            assert torch.allclose(continued, expected, atol=1e-5)


def test_a_cache_without_a_known_routing_is_refused():
    model = milora_model().eval()
    with torch.no_grad():
        with model.disable_adapter():
            cache = model(input_ids=random_tokens((1, 5), 1))[CACHE]  # produced with no routing at all
        with pytest.raises(RuntimeError, match="continues a KV cache, but no routing"):
            model(input_ids=random_tokens((1, 1), 3), **{CACHE: cache})


def test_a_prompt_mask_of_another_shape_is_refused():
    model = milora_model().eval()
    with pytest.raises(ValueError, match="prompt_mask must be"):
        model(input_ids=random_tokens((2, 5), 1), prompt_mask=torch.ones(2, 4))


def reference_logits(model, sequences, attention_mask, prompt_length):
    """Logits of every position of ``sequences``, routed on the first ``prompt_length`` columns (no cache)."""
    prompt_mask = torch.zeros_like(attention_mask)
    prompt_mask[:, :prompt_length] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return logits(
        model, input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        prompt_mask=prompt_mask, use_cache=False,
    )  # fmt: skip


GENERATION_MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0},
    "sample-3-sequences": {"do_sample": True, "top_k": 0, "num_return_sequences": 3},
    "beam-3": {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.0, "early_stopping": False},
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mode", list(GENERATION_MODES))
def test_every_generation_mode_routes_once_on_the_prompt(mode, use_cache, monkeypatch):
    """Each generated token is scored exactly as an independent forward over the whole sequence that routes on
    the prompt alone scores it; the routers run once per block per generate call."""
    model = milora_model().eval()
    ids, mask = left_pad([random_tokens(7, 11), random_tokens(4, 12)])
    calls = count_routes(monkeypatch)
    torch.manual_seed(0)
    new = 6
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, use_cache=use_cache,
        return_dict_in_generate=True, output_logits=True, output_scores=True, **GENERATION_MODES[mode],
    )  # fmt: skip
    assert calls == {id(r): 1 for r in routers(model).values()}
    copies = out.sequences.shape[0] // ids.shape[0]
    full_mask = torch.cat([mask.repeat_interleave(copies, 0), torch.ones(out.sequences.shape[0], new)], 1).long()
    reference = reference_logits(model, out.sequences, full_mask, ids.shape[1])[:, ids.shape[1] - 1 : -1]
    if mode.startswith("beam"):  # beams are reordered at every step: compare each sequence's score instead
        tokens = out.sequences[:, ids.shape[1] :]
        logprob = torch.log_softmax(reference, -1).gather(-1, tokens.unsqueeze(-1)).sum((-1, -2))
        assert torch.allclose(out.sequences_scores, logprob, atol=1e-4)
    else:
        assert torch.allclose(torch.stack(out.logits, dim=1), reference, atol=1e-4)


def test_generate_without_cache_on_an_unpadded_batch_routes_on_the_prompts(monkeypatch):
    """With several unpadded prompts and no attention mask, generate(use_cache=False) routes on the prompts."""
    model = milora_model().eval()
    ids = random_tokens((3, 5), 7)
    tokens = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(tokens, greedy_without_cache(model, ids, torch.ones_like(ids), 8))


def test_training_routes_on_the_prompt_marked_by_labels():
    model = milora_model()
    prompts, answers = [random_tokens(6, 1), random_tokens(4, 2)], [random_tokens(5, 3), random_tokens(7, 4)]
    ids, mask = right_pad([torch.cat([p, a]) for p, a in zip(prompts, answers, strict=True)])
    labels = torch.where(mask.bool(), ids, -100)
    for row, prompt in enumerate(prompts):
        labels[row, : len(prompt)] = -100
    model.train()(input_ids=ids, attention_mask=mask, labels=labels)
    trained = probabilities(model)
    model.eval()
    for row, prompt in enumerate(prompts):
        logits(model, input_ids=prompt.unsqueeze(0))  # what generation sees: the prompt
        for name, probs in probabilities(model).items():
            assert torch.allclose(trained[name][row], probs[0], atol=1e-6)


def test_prompt_mask_overrides_and_default_pools_all_attended_tokens():
    model = milora_model().eval()
    ids = random_tokens((2, 8), 5)
    prompt_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    labels = ids.clone()
    labels[:, :2] = -100
    logits(model, input_ids=ids, prompt_mask=prompt_mask, labels=labels)  # prompt_mask wins over labels
    overridden = probabilities(model)
    logits(model, input_ids=ids)
    everything = probabilities(model)
    for row, length in enumerate([3, 5]):
        logits(model, input_ids=ids[row : row + 1, :length])
        for name, probs in probabilities(model).items():
            assert torch.allclose(overridden[name][row], probs[0], atol=1e-6)
        logits(model, input_ids=ids[row : row + 1])
        for name, probs in probabilities(model).items():
            assert torch.allclose(everything[name][row], probs[0], atol=1e-6)


def test_pool_mask_rules():
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 3, 4, -100], [7, 8, 9, 1]])
    pool = build_pool_mask(attention, labels, None, 4)
    # row 0: attended & -100 -> position 1; row 1: position 0 (position 3 is padding);
    # row 2: nothing attended -> every position (never an empty pool)
    assert pool.tolist() == [[False, True, False, False], [True, False, False, False], [True] * 4]
    no_prompt = build_pool_mask(attention[:2], torch.ones(2, 4, dtype=torch.long), None, 4)
    assert torch.equal(no_prompt, attention[:2].bool())  # labels without -100: all attended tokens
    longer = build_pool_mask(torch.ones(2, 6), None, None, 4)  # attention mask covers a cache in front
    assert longer.shape == (2, 4)
    assert build_pool_mask(None, None, None, 4) is None
    with pytest.raises(ValueError, match="do not match"):
        build_pool_mask(torch.ones(2, 4), None, torch.ones(2, 3), 4)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding strategies: every one transformers offers routes on the prompt alone (or is refused).
# ---------------------------------------------------------------------------------------------------------------------

CACHE_MODES = {  # preallocated caches: generate hands the model a 4-D attention mask, not the 2-D one
    "static-cache": {"do_sample": False, "cache_implementation": "static"},
    "static-cache-beam-2": {"num_beams": 2, "cache_implementation": "static", "length_penalty": 0.0},
    "sliding-window-cache": {"do_sample": False, "cache_implementation": "sliding_window"},
    "hybrid-cache": {"do_sample": False, "cache_implementation": "hybrid"},
}


@pytest.mark.parametrize("mode", list(CACHE_MODES))
def test_preallocated_caches_keep_padding_out_of_the_pool(mode, monkeypatch):
    """A left-padded row generates what it generates alone: padding never enters its routers' pool, whatever mask
    form the cache implementation passes to the model; the routers run once."""
    model = milora_model().eval()
    sequences = [random_tokens(7, 21), random_tokens(4, 22)]
    ids, mask = left_pad(sequences)
    calls = count_routes(monkeypatch)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, **CACHE_MODES[mode]}
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert calls == {id(r): 1 for r in routers(model).values()}
    batched_probs = probabilities(model)
    copies = batched.shape[0] // ids.shape[0]  # returned sequences per prompt
    for row, sequence in enumerate(sequences):
        alone = model.generate(input_ids=sequence[None], **kwargs)
        for name, probs in probabilities(model).items():
            beams = batched_probs[name].shape[0] // len(sequences)  # routed rows per prompt
            torch.testing.assert_close(batched_probs[name][row * beams], probs[0], rtol=0, atol=1e-6, msg=(mode, row))
        got = batched[row * copies, ids.shape[1] :]
        assert got.tolist() == alone[0, len(sequence) :].tolist(), (mode, row)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="with CUDA the offloaded caches run; routing with them is not tested yet (no GPU in CI)",
)
@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches_need_cuda_upstream(implementation):
    """transformers' offloaded caches need CUDA: on CPU transformers itself refuses them (asserted as exactly
    that), before any routing."""
    model = milora_model().eval()
    with pytest.raises(AssertionError, match="Torch not compiled with CUDA enabled"):
        model.generate(input_ids=random_tokens((1, 4), 3), max_new_tokens=2, cache_implementation=implementation)


ASSISTED_MODES = {
    "prompt-lookup": lambda: {"prompt_lookup_num_tokens": 3},
    "assistant-model": lambda: {"assistant_model": tiny_llama(seed=5).eval()},
}


@pytest.mark.parametrize("mode", list(ASSISTED_MODES))
def test_assisted_decoding_routes_on_the_prompt_and_equals_greedy(mode, monkeypatch):
    """Assisted and prompt-lookup decoding hand the model the prompt plus draft tokens in its first forward; the
    routers pool over the prompt only, so the routing is the prompt's and the tokens equal greedy decoding's (which
    transformers guarantees for assisted greedy decoding)."""
    model = milora_model().eval()
    prompt = torch.cat([random_tokens(5, 31), random_tokens(5, 31)])[None]  # a repeat, so lookup finds drafts
    greedy = model.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = probabilities(model)
    calls = count_routes(monkeypatch)
    assisted = model.generate(
        input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, **ASSISTED_MODES[mode]()
    )
    assert calls == {id(r): 1 for r in routers(model).values()}
    for name, probs in probabilities(model).items():
        torch.testing.assert_close(probs, expected[name], rtol=0, atol=1e-6)
    assert assisted.tolist() == greedy.tolist()


def test_a_4d_attention_mask_needs_the_2d_mask_or_a_prompt_mask():
    """A plain forward with a 4-D mask: its padding cannot be told, so MiLoRA refuses unless ``prompt_mask`` says
    which tokens to route on (then it routes as with the 2-D mask)."""
    model = milora_model().eval()
    ids, mask = left_pad([random_tokens(6, 41), random_tokens(3, 42)])
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    four_d = (causal[None] & mask.bool()[:, None, :])[:, None]  # (B, 1, T, T) boolean, True = attend
    with pytest.raises(ValueError, match="4-D tensor.*padding tokens.*2-D `attention_mask`"):
        logits(model, input_ids=ids, attention_mask=four_d)
    logits(model, input_ids=ids, attention_mask=mask)
    with_2d = probabilities(model)
    logits(model, input_ids=ids, attention_mask=four_d, prompt_mask=mask)
    for name, probs in probabilities(model).items():
        torch.testing.assert_close(probs, with_2d[name], rtol=0, atol=1e-6)
