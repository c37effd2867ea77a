"""benchmarks/recall_recipes.py: a rerun into the same directory keeps what was scored only if it is comparable."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_recipes.py"
spec = importlib.util.spec_from_file_location("recall_recipes", SCRIPT)
recipes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipes)


def settings(**changes):
    results = {key: [256, 1024] if key == "lengths" else f"{key} value" for key in recipes.SETTINGS}
    return results | {"variants": {"b": {"sinks": 64}}, "models": {}} | changes


def test_rerun_keeps_scored_models_and_merges_variants(tmp_path):
    path = tmp_path / "results.json"
    assert recipes.earlier_models(path, settings()) == {}
    earlier = settings(variants={"a": {"sinks": 0}})
    earlier["models"] = {"teacher": {"retrieval": 1}, "a": {"retrieval": 0.5}, "c": {"error": "OutOfMemoryError"}}
    path.write_text(json.dumps(earlier))
    now = settings()
    kept = recipes.earlier_models(path, now)
    assert kept == {"teacher": {"retrieval": 1}, "a": {"retrieval": 0.5}}  # failed rows run again
    assert now["variants"] == {"a": {"sinks": 0}, "b": {"sinks": 64}}


@pytest.mark.parametrize("key", recipes.SETTINGS)
def test_rerun_with_other_settings_is_refused(tmp_path, key):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(settings()))
    with pytest.raises(SystemExit, match=f"scored with {key}="):
        recipes.earlier_models(path, settings(**{key: "another"}))
