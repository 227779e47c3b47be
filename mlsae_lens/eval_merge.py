"""Merge a new evaluation into the ``eval.json`` a run already holds, so nothing is lost.

``mlsae-lens eval RUN --baseline pca`` and then ``mlsae-lens eval RUN --downstream-tokens 0``
used to leave only the second result: the PCA method and the downstream section were gone, and
the report with them. Now, per method and per section, a newer result replaces an older one and
whatever was not recomputed is kept, marked with the options it was computed with. Evaluations
of other layers cannot share per-layer lists; then the previous file is kept beside the new one.
"""

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from mlsae_lens.atomic import atomic_file

logger = logging.getLogger(__name__)

# Per-method keys measured by the spliced (downstream) pass, see eval_downstream.downstream_scores.
DOWNSTREAM_KEYS = (
    "ce_loss_with_sae", "delta_ce", "kl_div_with_sae", "ce_loss_score", "ce_loss_score_mean_ablation",
    "kl_div_score", "kl_div_score_mean_ablation",
)
KEPT_KEY = "kept_from_previous_eval"
"""Top-level list of what came from an earlier evaluation; each kept method also carries
``evaluated_with`` (that evaluation's options)."""


def read_previous(path: Path) -> dict[str, Any] | None:
    """The eval.json at ``path`` when it is a readable evaluation, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        return None
    return data


def backup_name(path: Path) -> Path:
    """``eval.previous-<mtime>.json`` beside ``path``: where an unmergeable eval.json is kept."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    candidate, n = path.with_name(f"{path.stem}.previous-{stamp}{path.suffix}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.previous-{stamp}-{n}{path.suffix}")
    return candidate


def _has_downstream(method: dict[str, Any]) -> bool:
    return any(key in method.get("per_layer", {}) for key in DOWNSTREAM_KEYS)


def merge_evaluations(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """``new`` with what only ``old`` holds, and a line per change; ``(None, [why])`` when the two
    evaluated other layers (their per-layer lists cannot share one table)."""
    if old.get("layers") != new.get("layers") or old.get("n_layers") != new.get("n_layers"):
        return None, [f"the previous evaluation covered layers {old.get('layers')}, this one {new.get('layers')}"]
    merged = dict(new)
    methods = {name: dict(method) for name, method in new["methods"].items()}
    old_options = old.get("options")
    kept: list[str] = []
    changes = [f"replaced {name}" for name in methods if name in old["methods"]]
    for name, method in old["methods"].items():
        if name not in methods:
            methods[name] = {**method, "evaluated_with": method.get("evaluated_with", old_options)}
            kept.append(f"method {name}")
            changes.append(f"kept {name} from the previous evaluation (not recomputed now)")
    if "downstream" in old and "downstream" not in new:
        merged["downstream"] = {**old["downstream"], "evaluated_with": old_options}
        kept.append("downstream")
        changes.append("kept the downstream section (CE/KL) of the previous evaluation (skipped now)")
        for name, method in methods.items():
            previous = old["methods"].get(name)
            if name in new["methods"] and previous is not None and _has_downstream(previous):
                per_layer, mean = dict(method["per_layer"]), dict(method["mean"])
                for key in DOWNSTREAM_KEYS:
                    if key in previous.get("per_layer", {}):
                        per_layer[key] = previous["per_layer"][key]
                        mean[key] = previous.get("mean", {}).get(key)
                methods[name] = {**method, "per_layer": per_layer, "mean": mean}
    merged["methods"] = methods
    if kept:
        merged[KEPT_KEY] = sorted(set(kept) | set(old.get(KEPT_KEY, [])) - {f"method {n}" for n in new["methods"]}
                                  - ({"downstream"} if "downstream" in new else set()))
    return merged, changes


def merge_with_previous(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What to write to ``path`` (an ``eval.json``) instead of ``data``: merged with the earlier
    evaluation there, whose file is copied aside first when the two cannot be merged."""
    if not path.is_file():
        return data
    previous = read_previous(path)
    merged, changes = merge_evaluations(previous, data) if previous is not None else (None, ["it is not readable"])
    if merged is None:
        backup = backup_name(path)
        with atomic_file(backup) as tmp:
            shutil.copyfile(path, tmp)
        logger.warning("kept the previous %s as %s: %s", path.name, backup.name, changes[0])
        return data
    for change in changes:
        logger.info("%s: %s", path.name, change)
    return merged
