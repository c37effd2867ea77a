"""lm-eval integration: local-data tasks, `evaluate` and comparison tables (`lm_eval_tasks`).

Names resolve lazily, so `import hf_based.eval` needs no optional dependency (lm-eval is the `eval` extra).
"""

import importlib

_EXPORTS = {
    "LOCAL_TASKS": "hf_based.eval.lm_eval_tasks",
    "evaluate": "hf_based.eval.lm_eval_tasks",
    "format_comparison": "hf_based.eval.lm_eval_tasks",
    "format_results": "hf_based.eval.lm_eval_tasks",
    "write_local_tasks": "hf_based.eval.lm_eval_tasks",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
