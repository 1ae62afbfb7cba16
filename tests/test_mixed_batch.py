"""Mixed-adapter batches (``adapter_names=[...]``, ``loramix.routing.mixed_batch``): every row equals that row run alone.

The reference for a row is always the row run by itself (no padding, no other rows) with
``set_adapter(name)``, or with the adapter disabled for ``"__base__"``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from loramix import MiLoRAConfig, MoRConfig
from loramix.milora import layer as milora_layer
from loramix.routing.session import capture_routing
from tests.milora.common import CACHE, experts, left_pad, random_tokens, right_pad, wide_llama

# A padded batch and a row alone reduce in other orders and shapes (attention over padding, kernel choices by batch
# size), so float32 results agree to a few hundred unit roundoffs of the magnitude of what was reduced, which the
# largest logit of the row stands for: 1e-5 ≈ 170 u32 of it (an adapter or routing mix-up moves logits by > 1e-3,
# test_rows_differ_between_adapters).
TOLERANCE = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE * scale)


LENGTHS = (6, 9, 4, 7, 5)
NAMES = ["a", "b", "__base__", "b", "c"]


def configs(method: str) -> dict:
    """Three adapters of one method with different ranks, expert counts, top-k and target modules."""
    common = {"init_weights": False, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    if method == "mor":
        return {
            "a": MoRConfig(r=4, num_experts=2, **common),
            "b": MoRConfig(r=8, num_experts=4, target_modules=["down_proj", "q_proj"], **common),
            "c": MoRConfig(r=2, num_experts=3, target_modules=["up_proj"], layers_to_transform=[1], **common),
        }
    # lora_alpha = 2 r: the default scaling (64 / 32); each adapter with its own gate form
    return {
        "a": MiLoRAConfig(r=4, lora_alpha=8, top_k=2, **common),
        "b": MiLoRAConfig(
            r=8,
            lora_alpha=16,
            top_k=1,
            gate_form="probability",
            target_modules=["q_proj", "v_proj", "up_proj"],
            **common,
        ),
        "c": MiLoRAConfig(
            r=2,
            lora_alpha=4,
            top_k=3,
            gate_form="normalized",
            pooler="mean",
            activation="gelu",
            layers_to_transform=[0],
            **common,
        ),
    }


def tenants(tmp_path, method: str, **extra) -> PeftModel:
    """Adapters trained apart (saved separately), loaded side by side as a server would."""
    for seed, (name, config) in enumerate(configs(method).items()):
        for key, value in extra.get(name, {}).items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        get_peft_model(wide_llama(0), config).save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(wide_llama(0), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(tmp_path / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module", params=["mor", "milora"])
def method(request):
    return request.param


@pytest.fixture(scope="module")
def model(method, tmp_path_factory):
    return tenants(tmp_path_factory.mktemp(method), method)


def prompts(seed: int = 0) -> list[torch.Tensor]:
    return [random_tokens(n, seed + i) for i, n in enumerate(LENGTHS)]


def alone(model, name: str, fn):
    """``fn()`` with only ``name`` (or the base model for ``"__base__"``) applied."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    try:
        return fn()
    finally:
        model.set_adapter("a")


@torch.no_grad()
def test_forward_rows_equal_each_row_alone(model):
    sequences = prompts()
    ids, mask = right_pad(sequences)
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    assert model.active_adapters == ["a"]  # the call changed nothing
    for i, (name, sequence) in enumerate(zip(NAMES, sequences, strict=True)):
        reference = alone(model, name, lambda s=sequence: model(input_ids=s[None]).logits[0])
        assert_close(mixed[i, : len(sequence)], reference)


@torch.no_grad()
def test_one_adapter_on_every_row_is_the_plain_batch(model):
    """``adapter_names`` naming one adapter for every row computes exactly what ``set_adapter`` does."""
    ids, mask = left_pad(prompts(90))
    plain = alone(model, "b", lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, adapter_names=["b"] * len(LENGTHS)).logits, plain)


@torch.no_grad()
def test_rows_differ_between_adapters(model):
    """The reference is not trivially met: the adapters change the output, and differently."""
    ids = random_tokens(6)[None]
    outputs = {name: alone(model, name, lambda: model(input_ids=ids).logits) for name in ("a", "b", "c", "__base__")}
    values = list(outputs.values())
    assert all((x - y).abs().max() > 1e-3 for i, x in enumerate(values) for y in values[i + 1 :])


def record_alone(model, name: str, sequence: torch.Tensor, layer):
    """The routing record of ``layer`` when ``sequence`` runs by itself with adapter ``name``."""
    with capture_routing(model) as records:
        alone(model, name, lambda: model(input_ids=sequence[None]))
    return next(r for r in records if r.layer is layer)


def generate_alone(model, name, sequence, **kwargs):
    run = lambda: model.generate(input_ids=sequence[None], attention_mask=torch.ones_like(sequence)[None], **kwargs)  # noqa: E731
    return alone(model, name, run)


@torch.no_grad()
def test_greedy_generate_left_padded_equals_each_row_alone(model):
    sequences = prompts(10)
    ids, mask = left_pad(sequences)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
    for i, (name, sequence) in enumerate(zip(NAMES, sequences, strict=True)):
        reference = generate_alone(model, name, sequence, **kwargs)
        assert mixed.sequences[i, ids.shape[1] :].tolist() == reference.sequences[0, len(sequence) :].tolist()
        for step, logits in enumerate(reference.logits):
            assert_close(mixed.logits[step][i], logits[0])


@torch.no_grad()
def test_beam_search_keeps_each_rows_adapter(model):
    sequences = prompts(20)
    ids, mask = left_pad(sequences)
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
    assert mixed.shape[0] == 2 * len(NAMES)
    for i, (name, sequence) in enumerate(zip(NAMES, sequences, strict=True)):
        reference = generate_alone(model, name, sequence, **kwargs)
        assert mixed[2 * i : 2 * i + 2, ids.shape[1] :].tolist() == reference[:, len(sequence) :].tolist()


@torch.no_grad()
def test_sampling_with_returned_sequences_keeps_each_rows_adapter(model):
    """Sampling with top_k=1 is deterministic, so each of a row's returned sequences must be its greedy one."""
    sequences = prompts(30)
    ids, mask = left_pad(sequences)
    kwargs = {"max_new_tokens": 5, "do_sample": True, "top_k": 1, "num_return_sequences": 3}
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
    for i, (name, sequence) in enumerate(zip(NAMES, sequences, strict=True)):
        reference = generate_alone(model, name, sequence, max_new_tokens=5, do_sample=False)
        for j in range(3):
            assert mixed[3 * i + j, ids.shape[1] :].tolist() == reference[0, len(sequence) :].tolist()


@torch.no_grad()
def test_cache_continuation_needs_the_same_adapter_names(model):
    """Equal-length prompts (no padding), so a continued step can be compared with each row run alone."""
    ids = torch.stack([random_tokens(6, 40 + i) for i in range(len(NAMES))])
    first = model(input_ids=ids, adapter_names=NAMES, use_cache=True)
    step = {"input_ids": first.logits[:, -1:].argmax(-1)}
    cache = getattr(first, CACHE)
    shuffled = NAMES[1:] + NAMES[:1]
    with pytest.raises(RuntimeError, match="adapter_names"):
        model(**step, **{CACHE: cache}, adapter_names=shuffled)
    with pytest.raises(RuntimeError, match="adapter_names"):
        model(**step, **{CACHE: cache})  # the active adapter on every row
    with pytest.raises(RuntimeError, match="no forward of this model filled"):
        model(**step, **{CACHE: copy.deepcopy(cache)}, adapter_names=NAMES)  # a copy: its rows are unknown
    continued = model(**step, **{CACHE: cache}, adapter_names=NAMES).logits[:, -1]  # the same names continue it
    whole = torch.cat([ids, step["input_ids"]], dim=1)
    prompt = torch.cat([torch.ones_like(ids), torch.zeros_like(step["input_ids"])], dim=1)  # MiLoRA routes on it
    for i, name in enumerate(NAMES):
        run = lambda i=i: model(input_ids=whole[i : i + 1], prompt_mask=prompt[i : i + 1]).logits[0, -1]  # noqa: E731
        reference = alone(model, name, run)
        assert_close(continued[i], reference)


@torch.no_grad()
@pytest.mark.parametrize(
    "prompts_, names, kwargs",
    [
        (1, ["a", "b"], {"num_beams": 2}),  # one name per beam of one prompt
        (2, ["a", "b", "b", "a"], {"num_beams": 2, "num_return_sequences": 2}),  # one per returned sequence
        (2, ["a", "a", "b", "b"], {"do_sample": True, "top_k": 1, "num_return_sequences": 2}),
    ],
)
def test_generate_takes_one_adapter_name_per_prompt(model, prompts_, names, kwargs):
    """As PEFT's LoRA: a list sized for beams or returned sequences is refused (a prompt's beams share its
    adapter), and the refusal changes nothing: the same generate with one name per prompt gives what it gave."""
    ids = torch.stack([random_tokens(5, 50 + i) for i in range(prompts_)])
    per_prompt = names[:: len(names) // prompts_]
    before = model.generate(input_ids=ids, adapter_names=per_prompt, max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match=rf"Length of `adapter_names`.* {len(names)} and {prompts_} respectively"):
        model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, **kwargs)
    with pytest.raises(ValueError, match=rf"Length of `adapter_names`.* {len(names)} and {prompts_} respectively"):
        model(input_ids=ids, adapter_names=names)
    after = model.generate(input_ids=ids, adapter_names=per_prompt, max_new_tokens=3, **kwargs)
    assert torch.equal(before, after)


def test_peft_lora_refuses_names_per_beam_too():
    """The rule above is PEFT's own: its LoRA refuses the same list with the same message."""
    from peft import LoraConfig

    lora = get_peft_model(wide_llama(0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.eval()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        lora.generate(input_ids=random_tokens(5)[None], adapter_names=["default", "b"], num_beams=2, max_new_tokens=2)


def test_refusals(model, method, tmp_path):
    ids = random_tokens(5)[None].expand(3, -1)
    with pytest.raises(ValueError, match="training mode"):
        model.train()
        try:
            model(input_ids=ids, adapter_names=["a", "b", "a"])
        finally:
            model.eval()
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(input_ids=ids, adapter_names=["a", "typo", "a"])
    with pytest.raises(ValueError, match="Length of `adapter_names`.* 2 and 3"):
        model(input_ids=ids, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="Length of `adapter_names`.* 2 and 3"):
        model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=2)
    with pytest.raises(TypeError, match="list of adapter names"):
        model(input_ids=ids, adapter_names="a")
    with pytest.raises(ValueError, match="empty"):
        model(input_ids=ids, adapter_names=[])
    if method == "mor":  # MiLoRA never merges (tests/test_refusals.py)
        merged = get_peft_model(wide_llama(0), MoRConfig(num_experts=1, init_weights=False, task_type="CAUSAL_LM"))
        merged.eval().merge_adapter()
        with pytest.raises(ValueError, match="merged adapters"):
            merged(input_ids=ids, adapter_names=["default"] * 3)


def test_beam_expansion_checks_that_rows_are_copies(model):
    """generate repeats each prompt for its beams; a forward whose rows are not such copies cannot be matched."""
    from loramix.routing.mixed_batch import Requested, rows_for_batch

    ids = torch.stack([random_tokens(4, 1), random_tokens(4, 2), random_tokens(4, 3), random_tokens(4, 4)])
    with pytest.raises(ValueError, match="copies"):
        rows_for_batch(Requested(("a", "b"), frozenset({1, 2})), ids, None)
    rows = rows_for_batch(Requested(("a", "b"), frozenset({1, 2})), ids[[0, 0, 1, 1]], None)
    assert rows.names == ("a", "a", "b", "b")


@torch.no_grad()
def test_milora_rows_are_routed_by_their_own_adapter_once_per_prompt(tmp_path):
    model = tenants(tmp_path, "milora")
    sequences = prompts(50)
    ids, mask = left_pad(sequences)
    with capture_routing(model) as records:
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    routed = {(r.layer, r.adapter): r for r in records}
    assert len(routed) == len(records)  # each router of each adapter ran once: on the prompt, not per token
    for (router, adapter), record in routed.items():
        rows = [i for i, n in enumerate(NAMES) if n == adapter]
        assert record.rows.tolist() == rows
        for row_index, row in enumerate(rows):
            reference = record_alone(model, adapter, sequences[row], router)
            assert torch.equal(record.selected[row_index], reference.selected[0])
            torch.testing.assert_close(record.probs[row_index], reference.probs[0], rtol=0, atol=1e-6)
    per_adapter = {a for _, a in routed}
    assert per_adapter == {"a", "b", "c"}


@torch.no_grad()
def test_mor_records_each_rows_router_probabilities(tmp_path):
    model = tenants(tmp_path, "mor")
    sequences = prompts(80)
    ids, mask = right_pad(sequences)
    with capture_routing(model) as records:
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    assert {r.adapter for r in records} == {"a", "b", "c"}
    for record in records:
        assert record.rows.tolist() == [i for i, n in enumerate(NAMES) if n == record.adapter]
        for j, row in enumerate(record.rows.tolist()):
            sequence = sequences[row]
            reference = record_alone(model, record.adapter, sequence, record.layer)
            torch.testing.assert_close(record.probs[j, : len(sequence)], reference.probs[0], rtol=0, atol=1e-6)
            assert record.mask[j].tolist() == mask[row].tolist()


@torch.no_grad()
@pytest.mark.parametrize("used", [("a", "b", "c"), ("b",)], ids=["three adapters", "one adapter"])
def test_milora_expert_runs_only_over_rows_that_selected_it(tmp_path, monkeypatch, used):
    """Every expert computes exactly the rows whose own adapter selected it, with that row's router weight:
    per adapter (``gated_lora``) or, with several adapters in the batch, in one grouped call (``grouped_lora``)."""
    model = tenants(tmp_path, "milora")
    names = [used[i % len(used)] if i != 2 else "__base__" for i in range(len(NAMES))]
    calls = []  # (adapter, lora_A, rows, factor) per expert computed
    gated, grouped = milora_layer.F_milora.gated_lora, milora_layer.F_milora.grouped_lora

    def spy_gated(x, out, lora_A, lora_B, rows, factor, dropout=None):
        rows = range(x.shape[0]) if rows is None else rows.tolist()
        calls.append((lora_A.T, list(rows), factor.flatten()))
        return gated(x, out, lora_A, lora_B, None if rows == range(x.shape[0]) else torch.tensor(rows), factor, dropout)

    def spy_grouped(x, out, stack_A, stack_B, gather, counts, factor):
        for slot, count in enumerate(counts.tolist()):
            calls.append((stack_A[slot], gather[slot, :count].tolist(), factor[slot, :count]))
        return grouped(x, out, stack_A, stack_B, gather, counts, factor)

    monkeypatch.setattr(milora_layer.F_milora, "gated_lora", spy_gated)
    monkeypatch.setattr(milora_layer.F_milora, "grouped_lora", spy_grouped)
    ids, mask = right_pad(prompts(60))
    with capture_routing(model) as records:
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    module_names = {module: name for name, module in model.named_modules()}
    expected = {}  # (adapter, expert module name) -> (batch rows whose routing selected it, their factors)
    for record in records:
        block = module_names[record.layer].rsplit(".", 1)[0]
        for index, expert in enumerate(record.layer.expert_names[record.adapter]):
            chosen = record.selected[:, index]
            if chosen.any():
                scaling = model.get_submodule(f"{block}.{expert}").scaling[record.adapter]
                factors = record.gates[chosen, index] * scaling
                expected[(record.adapter, f"{block}.{expert}")] = (record.rows[chosen].tolist(), factors)
    experts_by_weight = [(a, n, m.milora_A[a]) for n, m in experts(model).items() for a in m.milora_A]
    seen = {}
    for weight_T, rows, factor in calls:
        adapter, name, lora_A = next(
            (a, n, w) for a, n, w in experts_by_weight
            if torch.equal(weight_T[:, : w.shape[0]], w.T) and not weight_T[:, w.shape[0] :].any()
        )  # fmt: skip
        seen[(adapter, name)] = (rows, factor)
    assert set(seen) == set(expected)  # an expert no row selected does not run at all
    for key, (rows, factor) in seen.items():
        assert rows == expected[key][0], key
        torch.testing.assert_close(factor.float(), expected[key][1], rtol=1e-6, atol=0)
    assert len(calls) == len(seen)


@torch.no_grad()
@pytest.mark.parametrize("method", ["mor", "milora"])
def test_modules_to_save_and_dora_follow_each_row(tmp_path, method):
    """A trained lm_head (modules_to_save) per adapter, and MiDoRA experts, are per row too (PEFT's LoRA
    refuses DoRA in mixed batches)."""
    extra = {"a": {"modules_to_save": ["lm_head"]}, "b": {"modules_to_save": ["lm_head"]}}
    if method == "milora":
        extra["c"] = {"use_dora": True}
    model = tenants(tmp_path, method, **extra)
    for name in ("a", "b"):
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save[name].weight.add_(0.1 * torch.randn(128, 32))
    sequences = prompts(70)
    ids, mask = right_pad(sequences)
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    for i, (name, sequence) in enumerate(zip(NAMES, sequences, strict=True)):
        reference = alone(model, name, lambda s=sequence: model(input_ids=s[None]).logits[0])
        assert_close(mixed[i, : len(sequence)], reference)


@torch.no_grad()
def test_encoder_decoder_forward_is_per_row_and_generate_refuses():
    """T5: a forward runs encoder and decoder inside the model's forward, so rows follow their adapters;
    ``generate`` calls the encoder by itself, outside it, where rows cannot be matched: it raises."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    model = T5ForConditionalGeneration(config)
    mor = dict(r=4, num_experts=2, target_modules=["wi", "wo"], init_weights=False, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(model, MoRConfig(**mor), adapter_name="a")
    model.add_adapter("b", MoRConfig(**mor))
    model.eval()
    ids, decoder_ids = random_tokens((3, 5), 1) % 64, random_tokens((3, 4), 2) % 64
    names = ["b", "__base__", "a"]
    mixed = model(input_ids=ids, decoder_input_ids=decoder_ids, adapter_names=names).logits
    for i, name in enumerate(names):
        reference = alone(
            model, name, lambda i=i: model(input_ids=ids[i : i + 1], decoder_input_ids=decoder_ids[i : i + 1])
        )
        assert_close(mixed[i], reference.logits[0])
    with pytest.raises(RuntimeError, match="outside a forward of the adapted model"):
        model.generate(input_ids=ids, adapter_names=names, max_new_tokens=2)


@torch.no_grad()
@pytest.mark.parametrize("names, grouped", [(NAMES, True), (["a"] * 8 + ["b", "c"], False)], ids=["balanced", "uneven"])
def test_mor_groups_adapters_unless_padding_would_double_the_work(tmp_path, monkeypatch, names, grouped):
    """Grouping pads every adapter of a layer to its largest group; when that would more than double the work
    (here 3 adapters x 8 slots for 10 rows; the padding budget that lets short inputs group anyway set to 0)
    each adapter runs on its own rows. Both ways, every row equals the row alone."""
    from loramix.mor.layer import Linear
    from loramix.routing import mixed_batch

    monkeypatch.setattr(mixed_batch, "PADDING_BUDGET", 0)

    model = tenants(tmp_path, "mor", c={"target_modules": ["down_proj"]})  # layer 1's down_proj: a, b and c
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert set(layer.mor_A) == {"a", "b", "c"}
    stacked = []
    original = Linear._add_grouped
    monkeypatch.setattr(Linear, "_add_grouped", lambda self, *a: stacked.append(self) or original(self, *a))
    sequences = [random_tokens(5 + i % 3, 100 + i) for i in range(len(names))]
    ids, mask = right_pad(sequences)
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert (layer in stacked) == grouped
    for i, (name, sequence) in enumerate(zip(names, sequences, strict=True)):
        reference = alone(model, name, lambda s=sequence: model(input_ids=s[None]).logits[0])
        assert_close(mixed[i, : len(sequence)], reference)


@torch.no_grad()
def test_encoder_modules_to_save_outside_the_forward_refuse():
    """A per-adapter ``modules_to_save`` in T5's encoder (no loramix layer there): ``generate`` runs the encoder
    outside the model's forward, where its rows cannot be matched, so PEFT's wrapper must not fall back to the
    active adapter for every row."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    mor = dict(r=4, num_experts=2, target_modules=r"decoder\.block\.\d+\.layer\.2\.DenseReluDense\.wi",
               modules_to_save=["SelfAttention.q"], init_weights=False, task_type="SEQ_2_SEQ_LM")  # fmt: skip
    model = get_peft_model(T5ForConditionalGeneration(config), MoRConfig(**mor), adapter_name="a")
    model.add_adapter("b", MoRConfig(**mor))
    model.eval()
    ids = random_tokens((2, 5), 3) % 64
    with pytest.raises(RuntimeError, match="ran outside a forward of the adapted model"):
        model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=2)


def test_padding_fits_bounds_the_padding():
    from loramix.routing.mixed_batch import PADDING_BUDGET, padding_fits

    assert padding_fits([4, 4, 4], 2048)  # no padding
    assert padding_fits([4, 1, 3], 2048)  # 4 padded rows for 8 real ones
    assert not padding_fits([63] + [1] * 15, 2048)  # 930 padded rows for 78 real ones, at a long prefill
    assert padding_fits([63] + [1] * 15, 1)  # the same at a decoding step: 930 token rows, under the budget
    assert not padding_fits([PADDING_BUDGET, 1, 1], 1)  # padding over both the real rows and the budget
