"""Triton side of the benchmark: repository variants, a server per variant, statistics deltas.

The benchmark never edits the exported repository. It copies the models it needs into a temporary repository
and writes their config.pbtxt again with the repository writer (biva_export.repository.graph_config), from the
serving config the export recorded with the variant's settings over it (dynamic batching on or off, ONNX
Runtime threads per instance, instances, preferred batch sizes, queue delay, spinning).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from biva_core.contract import FRONT_GRAPHS, REPORT, read_meta
from biva_export.serving_config import ServingConfig
from biva_export.repository import graph_config


@dataclass(frozen=True)
class Variant:
    dynamic_batching: bool = True  # False: the graph models' dynamic_batching block is removed
    threads: int = 0  # ONNX Runtime intra-op threads per graph instance (0: as exported)
    instances: int = 0  # instances per graph model (0: as exported)
    preferred: tuple[int, ...] | None = None  # preferred batch sizes (None: as exported; () none)
    queue_delay_us: int | None = None  # max queue delay of the dynamic batcher (None: as exported)
    spinning: bool | None = None  # ONNX Runtime intra-op threads busy-wait when idle (None: as exported)

    @property
    def layout(self) -> str:
        """'INSTANCESxTHREADS' plus ':spin' / ':nospin' where set, as --layouts spells it (0: as exported)."""
        spin = "" if self.spinning is None else (":spin" if self.spinning else ":nospin")
        return f"{self.instances}x{self.threads}{spin}"

    def over(self, sc: ServingConfig) -> ServingConfig:
        """The exported serving config with this variant's settings over it."""
        set_ = {"dynamic_batching": self.dynamic_batching, "threads": self.threads or None,
                "instances": self.instances or None, "preferred": self.preferred,
                "queue_delay_us": self.queue_delay_us, "spinning": self.spinning}
        return replace(sc, **{k: v for k, v in set_.items() if v is not None})


def parse_layout(text: str) -> dict[str, Any]:
    """'2x1:nospin' -> {instances: 2, threads: 1, spinning: False} (Variant fields)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?::(spin|nospin))?", text.strip())
    if m is None or "0" in (m.group(1), m.group(2)):
        raise ValueError(f"layout {text!r}: expected INSTANCESxTHREADS[:spin|:nospin], each >= 1, e.g. 1x2:nospin")
    return {"instances": int(m.group(1)), "threads": int(m.group(2)),
            "spinning": None if m.group(3) is None else m.group(3) == "spin"}


def exported_serving(repo: Path) -> ServingConfig:
    """The serving config biva-export recorded in the repository's report."""
    d = json.loads((repo / REPORT).read_text())["serving"]
    known = {f.name for f in fields(ServingConfig)}
    return ServingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def exported_instances(repo: Path) -> int:
    """The instances per graph model the repository was exported with."""
    return exported_serving(repo).instances


def write_variant(src: Path, dst: Path, models: list[str], v: Variant) -> Path:
    """Copy `models` (and the graphs the front models call) from repository `src` into `dst`, the graph models'
    configs written again for the variant."""
    wanted = set(models) | {g for m in models for g in FRONT_GRAPHS.get(m, ())}
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / REPORT, dst / REPORT)  # the model metadata (graph rows) travels with the models
    meta, sc = read_meta(src), v.over(exported_serving(src))
    specs = meta.graph_specs()
    for name in sorted(wanted):
        shutil.copytree(src / name, dst / name)
        if name in specs:  # a graph model
            (dst / name / "config.pbtxt").write_text(graph_config(specs[name], sc, meta))
    return dst


# ---- statistics -------------------------------------------------------------------------------------

def _ns(stats: dict, key: str) -> tuple[int, int]:
    d = stats.get("inference_stats", {}).get(key, {})
    return int(d.get("count", 0)), int(d.get("ns", 0))


def stats_snapshot(raw: Any, model: str) -> dict[str, int]:
    """Counters of one model from get_inference_statistics (http dict, or grpc as_json dict)."""
    for m in raw.get("model_stats", []):
        if m.get("name") == model:
            snap = {"inference_count": int(m.get("inference_count", 0)),
                    "execution_count": int(m.get("execution_count", 0))}
            for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
                snap[f"{key}_count"], snap[f"{key}_ns"] = _ns(m, key)
            return snap
    return {}


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Per request: queue and compute times (us) as Triton measured them, and the mean batch executed."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in after}
    n = d["success_count"]
    if n <= 0:
        return {"requests": 0}
    per = lambda key: d[f"{key}_ns"] / n / 1e3  # noqa: E731
    return {"requests": n, "executions": d["execution_count"],
            "mean_batch_rows": d["inference_count"] / d["execution_count"] if d["execution_count"] else 0.0,
            "queue_us": per("queue"), "compute_input_us": per("compute_input"),
            "compute_infer_us": per("compute_infer"), "compute_output_us": per("compute_output"),
            "request_us": per("success")}
