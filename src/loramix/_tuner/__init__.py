"""What every loramix tuner builds on: the config base, the tuner mixin, checks, and crash-safe saving and loading.

* :mod:`~loramix._tuner.config`: ``LoramixConfig``, the fields and checks both methods' configs share;
* :mod:`~loramix._tuner.tuner`: ``LoramixTunerMixin``, the behaviour both tuners share;
* :mod:`~loramix._tuner.validation`: argument checks with messages that name the field;
* :mod:`~loramix._tuner.saving`, :mod:`~loramix._tuner.loading`, :mod:`~loramix._tuner.undo`: crash-safe
  writes, strict state-dict checks, and putting a model back as it was when an operation fails.
"""
