"""lm-evaluation-harness model type ``loramix``: lm-eval's ``hf`` model, with MiLoRA routed on the context.

lm-eval's ``hf`` model scores a ``(context, continuation)`` pair in one forward of ``context +
continuation[:-1]``, so MiLoRA's routers pool over the answer being scored too (MoR, routed per token and
causal, is unaffected). ``--model loramix`` takes the same ``--model_args`` as ``hf`` (it is a subclass of
lm-eval's ``HFLM``) and scores loglikelihood requests with :func:`loramix.scoring.loglikelihood`, which
routes each row on its context, as ``generate`` and training do::

    lm_eval --model loramix --model_args pretrained=BASE,peft=ADAPTER --tasks ...

How the name reaches lm-eval: lm-eval 0.4 has no plugin entry points; its registry takes lazy
``"module:attr"`` placeholders (``lm_eval.api.registry``), and loramix's start-up hook
(:mod:`loramix_autoload`) adds ``loramix -> "loramix.lm_eval:LoramixLM"`` once lm-eval has imported its own
model table. Importing this module registers the class itself (``@register_model``, which replaces that
placeholder), so with the hook off (``LORAMIX_AUTOLOAD=0``) ``python -m loramix.lm_eval ARGS`` is lm-eval's CLI
with the model type registered. This module imports lm-eval: it is importable only where lm-eval is installed
(``pip install "loramix[lmeval]"``).

Only ``loglikelihood`` requests change. ``loglikelihood_rolling`` (perplexity) windows have no prompt to route
on and ``generate_until`` already routes on the prompt, so both are ``hf``'s own.
"""

from __future__ import annotations

import logging

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from loramix.scoring import loglikelihood

__all__ = ["LoramixLM"]

logger = logging.getLogger(__name__)

# (cache key, context token ids, continuation token ids): what lm-eval passes to _loglikelihood_tokens.
Request = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("loramix")
class LoramixLM(HFLM):
    """lm-eval's ``HFLM`` whose loglikelihood requests go through :func:`loramix.scoring.loglikelihood`.

    Rows are left-padded with explicit position ids and an attention mask, so a row's score does not depend
    on the batch it shares (``hf`` pads on the right without a mask: harmless for causal per-token models,
    but MiLoRA's pooling would take the padding in at batch sizes above 1).
    """

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        # Rolling windows (their cache key is None) and encoder-decoder models: hf's own scoring.
        if self.backend != "causal" or any(key is None for key, _, _ in requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        results = loglikelihood(
            self.model, pairs, route_on="context", batch_size=self._batch(override_bs), pad_token_id=pad
        )
        for (key, _, _), answer in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _batch(self, override_bs: int | None) -> int:
        """Rows per forward: ``batch_size``, or for ``auto`` lm-eval's own detection."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        return override_bs or self._detect_batch_size()

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """The pair cut to fit ``max_length`` as ``hf`` cuts it, by dropping context tokens from the left (the row is
        fed whole here, so it keeps ``max_length`` tokens; ``hf`` feeds all but the last of ``max_length + 1``)."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ValueError(
                f"A continuation of {len(continuation)} tokens leaves no room for its context in max_length={self.max_length}."
            )
        if len(context) > room:
            logger.warning(
                "Context of %d tokens cut to its last %d to fit max_length=%d.", len(context), room, self.max_length
            )
        return context[-room:], continuation
