"""Register loramix's PEFT methods in every Python process, as soon as PEFT is imported.

PEFT (0.21) discovers no third-party methods: a MoR or MiLoRA adapter loads only in a process that ran
``import loramix`` first. Evaluation harnesses, other people's scripts and notebooks never do, so
installing loramix also installs a one-line start-up file, ``loramix_autoload.pth``, into site-packages
(added to every wheel, editable ones included, by the build backend ``loramix_autoload/loramix_build.py``).
Python's :mod:`site` runs its line, ``import loramix_autoload; loramix_autoload.install()``, at start-up.

What runs at start-up is this module only: it imports nothing beyond :mod:`os` and :mod:`sys` (both loaded
already) and puts a finder on :data:`sys.meta_path` that finds nothing itself. When a watched module is
imported, the finder lets the other finders locate it and wraps its loader's ``exec_module``, so that
once the module has run to its end a callback runs:

* ``peft``: ``import loramix`` (which registers MoR and MiLoRA). This happens after ``peft/__init__.py``
  has completed, so loramix's own ``import peft....`` statements find a whole package, never a partial
  one; torch and transformers are loaded by then (PEFT imports them), so loramix adds only itself.
* ``lm_eval.models`` (lm-evaluation-harness's model table): the model type ``loramix`` is added to
  lm-eval's registry as a lazy ``"loramix.lm_eval:LoramixLM"`` placeholder, lm-eval's own mechanism for
  models imported on first use, so that ``lm_eval --model loramix`` works (:mod:`loramix.lm_eval`).

Each callback runs at most once per process; the finder leaves :data:`sys.meta_path` when none is left.
``LORAMIX_AUTOLOAD=0`` (or ``false``, ``no``, ``off``) in the environment when the interpreter starts
turns all of it off. Nothing here may break an interpreter: any error becomes one ``RuntimeWarning`` and
the process goes on without loramix's registration. :func:`status` says what happened (also
``python -m loramix_autoload``). docs/loading.md has the details.
"""

import os
import sys

__all__ = ["ENV_VAR", "LM_EVAL_MODEL", "PTH_NAME", "enabled", "install", "status"]

# No `from __future__ import annotations`: even that module is one more import at every start-up.

# The start-up file, as loramix_build (the build backend, which writes it) names it.
PTH_NAME = "loramix_autoload.pth"

ENV_VAR = "LORAMIX_AUTOLOAD"
_OFF_VALUES = frozenset({"0", "false", "no", "off"})

# The model type added to lm-eval's registry, and where its class lives.
LM_EVAL_MODEL = ("loramix", "loramix.lm_eval:LoramixLM")

# What happened in this process, for status(): None until install() ran.
_state: str | None = None
_watcher: "_Watcher | None" = None


def enabled() -> bool:
    """Whether the environment allows the automatic registration (``LORAMIX_AUTOLOAD`` unset or not off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def _warn(what: str, error: BaseException) -> None:
    """The one warning a failure produces; the process goes on."""
    import warnings  # only on failure: nothing beyond os and sys at start-up

    message = (
        f"loramix: {what} ({type(error).__name__}: {error}). The process goes on without it; "
        f"`import loramix` by hand shows the full error. Set {ENV_VAR}=0 to turn the automatic registration off."
    )
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Warning:  # warnings turned into errors (-W error): still never break the import that triggered us
        print(f"RuntimeWarning: {message}", file=sys.stderr)


def _register_with_peft() -> None:
    """``import loramix``, whose import registers MoR and MiLoRA with PEFT."""
    global _state
    if "loramix" in sys.modules:  # the user's own `import loramix` is what imported peft: it registers
        _state = "active: registered by `import loramix`"
        return
    try:
        import loramix
    except Exception as error:
        _state = f"failed: `import loramix` raised {type(error).__name__}: {error}"
        _warn("could not register MoR and MiLoRA with PEFT when peft was imported", error)
        return
    _state = f"active: loramix {loramix.__version__} registered MOR and MILORA when peft was imported"


def _register_with_lm_eval() -> None:
    """Add the ``loramix`` model type to lm-eval's registry, as a placeholder imported on first use."""
    try:
        from lm_eval.api.registry import model_registry

        name, target = LM_EVAL_MODEL
        if name not in model_registry:
            model_registry.register(name, target=target)
    except Exception as error:
        _warn("could not add the `loramix` model type to lm-eval", error)


# module name -> what to run once it has been imported
_CALLBACKS = {"peft": _register_with_peft, "lm_eval.models": _register_with_lm_eval}


class _Watcher:
    """A :data:`sys.meta_path` finder that finds nothing itself: for a watched module it returns the spec the
    other finders give, with the loader's ``exec_module`` wrapped to run the module's callback after it.

    The wrapping is done on every lookup, not only the first: ``importlib.util.find_spec("peft")`` (how
    transformers checks that PEFT is installed) asks the finders without importing, and the import that
    follows gets a new loader from a new lookup.
    """

    def __init__(self, callbacks: dict) -> None:
        self.pending = dict(callbacks)
        self.looking_up: set[str] = set()

    def find_spec(self, fullname: str, path=None, target=None):
        # Not re-entrant: a finder that itself calls importlib.util.find_spec would otherwise come back here.
        if fullname not in self.pending or fullname in self.looking_up:
            return None
        self.looking_up.add(fullname)
        try:
            spec = self._others_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                self._wrap(spec.loader, fullname)
            return spec
        except Exception as error:  # a bug here must not break the import: stop watching, warn once
            self.remove()
            _warn(f"the import hook failed on {fullname!r}", error)
            return None
        finally:
            self.looking_up.discard(fullname)

    def _others_spec(self, fullname: str, path, target):
        """The spec the rest of :data:`sys.meta_path` gives for ``fullname`` (``None``: not found)."""
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _wrap(self, loader, fullname: str) -> None:
        """Make ``loader.exec_module`` run ``fullname``'s callback once the module has executed without error."""
        original = loader.exec_module
        if getattr(original, "_loramix_autoload", False):  # a loader shared by several modules (zipimport)
            return

        def exec_module(module) -> None:
            original(module)  # the module runs to its end first: no partial package is ever seen
            if module.__name__ != fullname:
                return
            if loader.__dict__.get("exec_module") is exec_module:
                del loader.exec_module  # the loader is as it was
            callback = self.pending.pop(fullname, None)
            if not self.pending:
                self.remove()
            if callback is not None:
                callback()

        exec_module._loramix_autoload = True
        loader.exec_module = exec_module

    def remove(self) -> None:
        """Leave :data:`sys.meta_path` (no-op if already gone)."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def install() -> None:
    """What the start-up file runs: watch for ``peft`` and ``lm_eval.models`` unless ``LORAMIX_AUTOLOAD`` is off.

    Idempotent. A module that is already imported gets its callback now.
    """
    global _state, _watcher
    try:
        if _state is not None:
            return
        if not enabled():
            _state = f"off: {ENV_VAR}={os.environ.get(ENV_VAR)}"
            return
        _state = "waiting: loramix registers MoR and MiLoRA when peft is imported"
        _watcher = _Watcher({name: call for name, call in _CALLBACKS.items() if name not in sys.modules})
        if _watcher.pending:
            sys.meta_path.insert(0, _watcher)
        for name, callback in _CALLBACKS.items():
            if name in sys.modules:
                callback()
    except Exception as error:
        _warn("the start-up hook failed", error)


def status() -> str:
    """One line saying whether this process registers loramix's methods automatically, and what happened.

    ``"active: ..."``, ``"waiting: ..."`` (peft not imported yet), ``"failed: ..."``, ``"off: ..."``
    (``LORAMIX_AUTOLOAD``), or ``"not installed: ..."`` (the start-up file did not run: ``python -S``, or
    loramix installed without it).
    """
    if _state is None:
        return f"not installed: {PTH_NAME} did not run in this process (python -S, or a loramix install without it)"
    return _state
