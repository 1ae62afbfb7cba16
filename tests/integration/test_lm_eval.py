"""lm-evaluation-harness evaluates loramix adapters through its own command line, with no ``import loramix``.

``lm_eval --model hf --model_args pretrained=<base>,peft=<adapter>`` loads the adapter with
``PeftModel.from_pretrained``; the start-up hook (``loramix_autoload``) has registered loramix's methods by
then. ``--model loramix`` is lm-eval's ``hf`` with loglikelihood requests scored by
:func:`loramix.scoring.loglikelihood` (MiLoRA routed on the context); the hook adds it to lm-eval's registry.

Each run is a subprocess, offline, on a multiple-choice task read from a local JSON file
(``lm_eval_task/``), for a tiny model with a character tokenizer saved to a temporary directory. The
per-item log-likelihoods from ``--log_samples`` are compared with values computed here, in the test
process, from the same saved files:

* ``hf`` with MoR: :func:`loramix.scoring.loglikelihood` (MoR routes per token and causally, so one forward
  of context + continuation scores it as generation would);
* ``hf`` with MiLoRA: one plain forward of ``context + continuation[:-1]``, what ``hf`` computes: MiLoRA's
  routers then pool over the answer being scored, and the test checks that this differs from the context
  routing by far more than the tolerance (the reason for ``--model loramix``);
* ``loramix`` with MiLoRA: :func:`loramix.scoring.loglikelihood`, routed on the context.

Tolerance: lm-eval computes in float32 (log-softmax and the sum over continuation tokens) at its own batch
shapes and padding; the references run in float32 up to the logits at other shapes, then in float64.
float32 carries about 7 significant digits, so a sum near -80 of up to 18 token log-probabilities is known
to about 1e-5, and a different reduction order moves each logit by about 1e-6 relative. 1e-4 bounds both
(measured: at most 4e-6); the MiLoRA routing difference it must not hide is about 1e-1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramix import MiLoRAConfig, MoRConfig
from loramix.scoring import loglikelihood
from tests.integration.helpers import char_tokenizer
from tests.tiny_models import tiny_llama

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the `test` extra (pip install -e '.[test]')")

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASK = "loramix_tiny"
TOLERANCE = 1e-4
METHODS = {
    "mor": lambda: MoRConfig(r=4, num_experts=3, init_weights=False, task_type="CAUSAL_LM"),
    "milora": lambda: MiLoRAConfig(r=4, top_k=2, init_weights=False, task_type="CAUSAL_LM"),
}
# run -> (lm-eval model type, adapter, batch size). The `loramix` run batches rows of different lengths: its
# scores must not depend on the batch (left padding, position ids); `hf` runs at lm-eval's default of 1, since
# it pads on the right without an attention mask, which MiLoRA's pooling would take in.
RUNS = {"hf-mor": ("hf", "mor", 1), "hf-milora": ("hf", "milora", 1), "loramix-milora": ("loramix", "milora", 4)}

Item = tuple[str, str]  # (context, continuation) as lm-eval logs them
Score = tuple[float, bool]  # (log-likelihood, is_greedy)


def lm_eval_command() -> list[str]:
    """The ``lm_eval`` console script of this environment (``python -m lm_eval`` if it has none)."""
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]


def read_samples(output: Path) -> tuple[list[Item], list[Score]]:
    """Items and lm-eval's scores from its ``--log_samples`` file, in document then choice order."""
    [path] = output.glob(f"*/samples_{TASK}_*.jsonl")
    docs = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda doc: doc["doc_id"])
    items, scores = [], []
    for doc in docs:
        keys = sorted(doc["arguments"], key=lambda key: int(key.rsplit("_", 1)[1]))  # gen_args_0, gen_args_1, ...
        items += [(doc["arguments"][key]["arg_0"], doc["arguments"][key]["arg_1"]) for key in keys]
        scores += [(float(value), flag == "True") for [[value, flag]] in doc["resps"]]
    return items, scores


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict[str, tuple[list[Item], list[Score]]]]:
    """Save the base model, its tokenizer and an adapter per method, then run every ``lm_eval`` of
    :data:`RUNS` at once (each is mostly lm-eval's start-up: about 35 s alone) and read their samples."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = char_tokenizer()
    vocab = len(tokenizer)  # lm-eval resizes the embeddings to the tokenizer's size when they differ
    tiny_llama(vocab_size=vocab).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for method, config in METHODS.items():
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(vocab_size=vocab), config())
        model.peft_config["default"].base_model_name_or_path = str(root / "base")
        model.save_pretrained(root / method)
    shutil.copytree(TASK_DIR, root / "task")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),  # the JSON dataset's cache, away from the user's
        "LORAMIX_AUTOLOAD": "1",
        "OMP_NUM_THREADS": "1",  # the runs share the machine
        "TOKENIZERS_PARALLELISM": "false",
    }
    processes = {}
    for run, (model_type, adapter, batch_size) in RUNS.items():
        args = ["--model", model_type, "--model_args", f"pretrained={root / 'base'},peft={root / adapter}"]
        args += ["--tasks", TASK, "--include_path", ".", "--device", "cpu", "--batch_size", str(batch_size)]
        args += ["--output_path", str(root / run), "--log_samples"]
        log = (root / f"{run}.log").open("w")
        # cwd: the task's data_files path is relative to it
        processes[run] = (
            subprocess.Popen([*lm_eval_command(), *args], cwd=root / "task", env=env, stdout=log, stderr=log),
            log,
        )
    failures = []
    for run, (process, log) in processes.items():
        returncode = process.wait(timeout=600)
        log.close()
        if returncode != 0:
            failures.append(f"{run}: exit {returncode}\n{(root / f'{run}.log').read_text()[-3000:]}")
    assert not failures, "\n".join(failures)
    return root, {run: read_samples(root / run) for run in RUNS}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM._encode_pair``: the context's trailing spaces move to the continuation, and the
    continuation's tokens are those of the whole string after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def one_forward(model, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
    """What lm-eval's ``hf`` computes: one forward of ``context + continuation[:-1]`` per item, no mask."""
    scores = []
    for context, continuation in pairs:
        logits = model(input_ids=torch.tensor([context + continuation[:-1]])).logits[0, -len(continuation) :]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(continuation)
        total = logprobs.gather(-1, targets[:, None]).sum()
        scores.append((float(total), bool(logprobs.argmax(-1).eq(targets).all())))
    return scores


def references(root: Path, adapter: str, items: list[Item]) -> dict[str, list[Score]]:
    """Scores of ``items`` in this process: ``loramix.scoring`` (routed on the context) and :func:`one_forward`."""
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / adapter).eval()
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in items]
    return {"context": loglikelihood(model, pairs), "one forward": one_forward(model, pairs)}


def assert_close(got: list[Score], expected: list[Score]) -> None:
    assert len(got) == len(expected) == 12  # 4 questions x 3 choices
    for index, ((value, greedy), (reference, reference_greedy)) in enumerate(zip(got, expected, strict=True)):
        assert abs(value - reference) <= TOLERANCE, (index, value, reference)
        assert greedy == reference_greedy, index


def test_hf_model_scores_mor_as_generation_does(evaluated):
    root, runs = evaluated
    items, scores = runs["hf-mor"]
    assert_close(scores, references(root, "mor", items)["context"])


def test_hf_model_routes_milora_on_context_and_continuation(evaluated):
    root, runs = evaluated
    items, scores = runs["hf-milora"]
    expected = references(root, "milora", items)
    assert_close(scores, expected["one forward"])
    # Not the routing of generation: the test can tell the two apart.
    assert max(abs(a - b) for (a, _), (b, _) in zip(scores, expected["context"], strict=True)) > 100 * TOLERANCE


def test_loramix_model_routes_milora_on_the_context(evaluated):
    root, runs = evaluated
    items, scores = runs["loramix-milora"]
    assert items == runs["hf-milora"][0]
    assert_close(scores, references(root, "milora", items)["context"])


def test_importing_the_module_registers_the_model_type_without_the_hook():
    """With ``LORAMIX_AUTOLOAD=0`` lm-eval knows no ``loramix`` model until ``loramix.lm_eval`` is imported, which
    is what ``python -m loramix.lm_eval`` (lm-eval's CLI with the model type) does first."""
    code = """
        from lm_eval.api.registry import get_model
        try:
            get_model("loramix")
        except ValueError:
            print("unknown before")
        import loramix.lm_eval
        print(get_model("loramix") is loramix.lm_eval.LoramixLM)
    """
    env = {**os.environ, "LORAMIX_AUTOLOAD": "0"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["unknown", "before", "True"]
    cli = subprocess.run([sys.executable, "-m", "loramix.lm_eval", "--help"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and "lm-eval" in cli.stdout.lower(), cli.stdout + cli.stderr[-3000:]
