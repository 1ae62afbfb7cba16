"""loramix: Mixture-of-LoRA methods for Hugging Face PEFT.

``import loramix`` registers the methods with PEFT, after which they are used like PEFT's own::

    import loramix
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, loramix.MoRConfig(r=8, num_experts=8, task_type="CAUSAL_LM"))
    model.save_pretrained("out")
    model = PeftModel.from_pretrained(base, "out")

Installed loramix also registers them in any process as soon as it imports ``peft`` (the start-up hook of
``loramix_autoload``; ``LORAMIX_AUTOLOAD=0`` turns it off): loading an adapter needs no ``import loramix``.
"""

from importlib.metadata import PackageNotFoundError, version

from ._compat.peft import register
from .milora import MiLoRAConfig, MiLoRAModel
from .milora.method import METHOD as MILORA
from .mor import MoRConfig, MoRModel
from .mor.method import METHOD as MOR

try:
    __version__ = version("loramix")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

# One line per method (its declaration: loramix/<method>/method.py).
register(MOR)
register(MILORA)

__all__ = ["MiLoRAConfig", "MiLoRAModel", "MoRConfig", "MoRModel", "__version__"]
