"""``python -m loramix.lm_eval ARGS``: lm-eval's command line (the arguments of ``lm_eval``) with the ``loramix``
model type registered, for processes where the start-up registration is off (``LORAMIX_AUTOLOAD=0``)."""

from lm_eval.__main__ import cli_evaluate

import loramix.lm_eval  # noqa: F401  (registers the model type)

if __name__ == "__main__":
    cli_evaluate()
