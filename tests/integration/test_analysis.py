"""Router analysis: statistics as plain data (checked against the model's own balance loss and by hand),
per-task grouping, PNG plots, and no double counting under checkpointing or decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loramix.analysis import RoutingRecorder, plot_routing, plot_routing_heatmap, plot_task_bars, router_statistics
from loramix.analysis import summarize as summarize_stats
from tests.deprecations import IGNORE_UPSTREAM_DEPRECATIONS
from tests.integration.helpers import METHOD_NAMES, enable_activation_checkpointing, peft_model, sequences

pytestmark = pytest.mark.filterwarnings(*IGNORE_UPSTREAM_DEPRECATIONS, "ignore::UserWarning")


def batches():
    """Two batches of two sequences, one left-padded row each, with task labels and a prompt."""
    result = []
    for seed, tasks in ((1, ["add", "copy"]), (2, ["copy", "copy"])):
        ids = sequences(rows=2, length=10, seed=seed)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100  # MiLoRA routes on the prompt (labels -100)
        result.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "task": tasks})
    return result


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_statistics_are_plain_consistent_data(method):
    model = peft_model(method)
    stats = router_statistics(model, batches())
    json.dumps(stats)  # plain data
    n = stats["num_experts"]
    assert stats["method"] == method and len(stats["expert_names"]) == n
    expected_rows = 4 * 10 - 2 * 3 if method == "mor" else 4  # tokens without padding / prompts
    assert stats["rows"] == expected_rows
    assert set(stats["tasks"]) == {"add", "copy"}
    assert sum(stats["tasks"][t]["rows"] for t in stats["tasks"]) == expected_rows
    assert len(stats["usage"]) == len(stats["layers"]) > 0
    k = stats["top_k"]
    for usage, prob, entropy, balance in zip(
        stats["usage"], stats["mean_prob"], stats["entropy"], stats["balance"], strict=True
    ):
        assert len(usage) == len(prob) == n
        assert sum(usage) == pytest.approx(k) and sum(prob) == pytest.approx(1.0)
        assert 0.0 <= entropy <= math.log(n) + 1e-6
        assert 0.0 < balance <= n + 1e-6
    summary = summarize_stats(stats)
    assert 0.0 < summary["normalized_entropy"] <= 1.0 + 1e-6


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_balance_equals_the_models_aux_loss_on_one_batch(method):
    """The per-layer Switch balance of the statistics, averaged over layers, is the model's aux loss."""
    model = peft_model(method).eval()
    batch = batches()[0]
    inputs = {k: v for k, v in batch.items() if k != "task"}
    with torch.no_grad():
        aux = model(**inputs).aux_loss.item()
    stats = router_statistics(model, [batch])
    balances = [b for b in stats["balance"] if b is not None]
    assert sum(balances) / len(balances) == pytest.approx(aux, rel=1e-5)
    assert stats["aux_loss"] == pytest.approx(aux, rel=1e-6)


def test_mor_statistics_by_hand():
    """MoR: mean router probability and top-1 usage of one layer, recomputed with plain loops."""
    model = peft_model("mor")
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    stats = router_statistics(model, batches())
    handle.remove()
    rows = []
    for x, batch in zip(seen, batches(), strict=True):
        probs = torch.softmax(x.double() @ layer.mor_router["default"].double().T, dim=-1)
        rows += [probs[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if batch["attention_mask"][b, t]]
    i = stats["layers"].index("model.layers.1.mlp.up_proj")
    n = len(rows[0])
    mean = [sum(r[e].item() for r in rows) / len(rows) for e in range(n)]
    usage = [sum(int(r.argmax()) == e for r in rows) / len(rows) for e in range(n)]
    assert stats["mean_prob"][i] == pytest.approx(mean, rel=1e-5)
    assert stats["usage"][i] == pytest.approx(usage)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_double_counting_under_checkpointing(method):
    counts = []
    for checkpointing in (False, True):
        model = peft_model(method).train()
        if checkpointing:
            enable_activation_checkpointing(model, False)
        with RoutingRecorder(model, training_only=True) as recorder:
            inputs = {k: v for k, v in batches()[0].items() if k != "task"}
            model(**inputs).loss.backward()
            with torch.no_grad():
                model.eval()(**inputs)  # not counted: training_only
        counts.append(recorder.summary()["rows"])
    assert counts[0] == counts[1] > 0


def test_milora_decoding_counts_each_prompt_once():
    if "milora" not in METHOD_NAMES:
        pytest.skip("MiLoRA is not available in this build")
    model = peft_model("milora").eval()
    prompts = sequences(rows=3, length=6)
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=4, do_sample=False)
    assert recorder.summary()["rows"] == 3  # one row per prompt, not per generated token


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_plots_are_written(tmp_path, method):
    pytest.importorskip("matplotlib")
    stats = router_statistics(peft_model(method), batches())
    paths = plot_routing(stats, tmp_path)
    assert set(paths) == {"heatmap", "tasks"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    plot_routing_heatmap(stats, tmp_path / "prob.png", value="mean_prob", task="copy")
    plot_task_bars(stats, tmp_path / "mean.png", layer="mean", value="usage")
    name = stats["layers"][0]
    plot_task_bars(stats, tmp_path / "named.png", layer=name)
    if method == "mor":
        plot_routing_heatmap(stats, tmp_path / "gate.png", modules="gate_proj")
        with pytest.raises(ValueError, match="matches"):
            plot_task_bars(stats, tmp_path / "x.png", layer="proj")
    with pytest.raises(ValueError, match="usage"):
        plot_routing_heatmap(stats, tmp_path / "x.png", value="entropy")


def test_statistics_need_a_loramix_model():
    from tests.tiny_models import tiny_llama

    with pytest.raises(ValueError, match="peft_config"):
        router_statistics(tiny_llama(), batches())
