"""loramix: Mixture-of-LoRA methods for Hugging Face PEFT.

``import loramix`` registers the methods with PEFT, after which they are used like PEFT's own::

    import loramix
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, loramix.MoRConfig(r=8, num_experts=8, task_type="CAUSAL_LM"))
    model.save_pretrained("out")
    model = PeftModel.from_pretrained(base, "out")   # needs `import loramix` first in that process
"""

from importlib.metadata import PackageNotFoundError, version

from ._registration import register
from .milora import MiLoRAConfig, MiLoRAModel
from .mor import MoRConfig, MoRModel

try:
    __version__ = version("loramix")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

register("mor", MoRConfig, MoRModel)
register("milora", MiLoRAConfig, MiLoRAModel)

__all__ = ["MiLoRAConfig", "MiLoRAModel", "MoRConfig", "MoRModel", "__version__"]
