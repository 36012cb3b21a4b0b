"""Makes `lm_eval --model dlm` work once dlm is installed (lm-evaluation-harness 0.4 has no plugin entry points).

lm-eval 0.4 finds a model only in its own registry, which `lm_eval.models` fills with lazy placeholders. dlm's wheel
(regular or editable, see setup.py) installs `dlm_lm_eval.pth` into site-packages; Python runs its one line at
start-up, which loads this file as the module `dlm_lm_eval_hook` and calls `install()`. That puts a finder first in
`sys.meta_path` and does nothing else: no module of dlm, torch or lm-eval is imported. When (and only when) a program
imports `lm_eval.models`, the finder runs that module as usual and then registers `dlm` as one more lazy placeholder,
`trainers.lm_eval_dlm:DiffusionLMEval`, which lm-eval imports on `--model dlm` only.

The .pth line loads this file by its path (found with `importlib.util.find_spec("trainers")`, which imports nothing)
instead of importing `trainers.lm_eval_hook`: importing the package at start-up would pin `trainers` in
`sys.modules` before the script's folder is on `sys.path`, and shadow a user's own package of that name. So this
module imports only the standard library.
"""

from __future__ import annotations

import sys
import warnings


#: the module whose execution fills lm-eval's model registry
LM_EVAL_MODELS = "lm_eval.models"
#: lm-eval's name for the model, and where the class lives ("module:object", lm-eval's placeholder syntax)
MODEL_NAME = "dlm"
MODEL_TARGET = "trainers.lm_eval_dlm:DiffusionLMEval"


def register() -> None:
    """Add `dlm` to lm-eval's model registry as a lazy placeholder (a no-op when it is there already)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfterLmEvalModels:
    """A `sys.meta_path` finder that only answers for `lm_eval.models`: it takes the spec the other finders give,
    and wraps its loader's `exec_module` so that `register()` runs right after the module's own code."""

    #: marks every copy of this finder (site-packages can be processed twice, e.g. through a lib64 -> lib link)
    dlm_lm_eval_hook = True

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != LM_EVAL_MODELS:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "dlm_lm_eval_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as err:  # lm-eval changed its registry: say so, and leave lm-eval itself working
                warnings.warn(f"dlm could not register the lm-eval model {MODEL_NAME!r} ({type(err).__name__}: "
                              f"{err}); `dlm lm-eval ...` registers it by importing trainers.lm_eval_dlm",
                              RuntimeWarning, stacklevel=2)

        loader.exec_module = exec_then_register  # this spec's own loader instance only
        return spec


def install() -> None:
    """Called by `dlm_lm_eval.pth` at interpreter start-up; idempotent."""
    if LM_EVAL_MODELS in sys.modules:  # imported already (install() called late): register now
        register()
    elif not any(getattr(finder, "dlm_lm_eval_hook", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLmEvalModels)  # first: the finders after it would answer instead
