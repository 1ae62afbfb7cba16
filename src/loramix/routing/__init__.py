"""The routing runtime shared by the methods: one :class:`RoutingSession` per forward of an adapted model.

* :mod:`~loramix.routing.session`: the session (which tokens route, which routing a forward reuses), the hooks
  that open and close it, and the records routers leave in it for ``aux_loss``, ``router_logits`` and analysis;
* :mod:`~loramix.routing.mixed_batch`: PEFT's ``adapter_names`` (a different adapter per row);
* :mod:`~loramix.routing.balance`: the Switch balance loss.

The output fields routing adds (``aux_loss``, ``router_logits``, ``lm_loss``) are set through the transformers
fence, :func:`loramix._compat.transformers.with_output_fields`.
"""

from . import session
from .session import *  # noqa: F403 (the session's public names are the package's)

__all__ = list(session.__all__)
