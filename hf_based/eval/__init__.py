"""lm-eval integration: local-data tasks, `evaluate` and comparison tables. lm-eval itself (the `eval` extra) is
imported when a task runs, so this package imports without it."""

from hf_based.eval.lm_eval_tasks import LOCAL_TASKS, evaluate, format_comparison, format_results, write_local_tasks

__all__ = ["LOCAL_TASKS", "evaluate", "format_comparison", "format_results", "write_local_tasks"]
