"""Triton side of the benchmark: repository variants, a server per variant, statistics deltas.

The benchmark never edits the exported repository. It copies the models it needs into a temporary
repository and rewrites their config.pbtxt for the variant under test (dynamic batching on or off,
ONNX Runtime threads per instance, instances, preferred batch sizes, queue delay); every rewritten config
is parsed back into Triton's ModelConfig before the server starts.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biva_export.contract import FRONT_GRAPHS, REPORT, SPINNING_PARAMETER, THREADS_PARAMETER
from biva_export.repository import parse_config


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


def parse_layout(text: str) -> dict[str, Any]:
    """'2x1:nospin' -> {instances: 2, threads: 1, spinning: False} (Variant fields)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?::(spin|nospin))?", text.strip())
    if m is None or "0" in (m.group(1), m.group(2)):
        raise ValueError(f"layout {text!r}: expected INSTANCESxTHREADS[:spin|:nospin], each >= 1, e.g. 1x2:nospin")
    return {"instances": int(m.group(1)), "threads": int(m.group(2)),
            "spinning": None if m.group(3) is None else m.group(3) == "spin"}


def exported_instances(model_dir: Path) -> int:
    """The instance count in a model's config.pbtxt (1 where it names none)."""
    m = re.search(r"instance_group \[ \{ count: (\d+)", (model_dir / "config.pbtxt").read_text())
    return int(m.group(1)) if m else 1


def rewrite_graph_config(text: str, v: Variant) -> str:
    """A graph model's config.pbtxt with the variant's settings."""
    if v.threads:
        text = re.sub(rf'(key: "{THREADS_PARAMETER}" value: \{{ string_value: )"\d+"', rf'\1"{v.threads}"', text)
    if v.instances:
        text = re.sub(r"instance_group \[ \{ count: \d+", f"instance_group [ {{ count: {v.instances}", text)
    if v.spinning is not None:
        flag = "1" if v.spinning else "0"
        line = f'parameters {{ key: "{SPINNING_PARAMETER}" value: {{ string_value: "{flag}" }} }}\n'
        text, n = re.subn(rf'parameters \{{ key: "{SPINNING_PARAMETER}"[^\n]*\n', line, text)
        if not n:  # a repository exported before the option existed
            text += line
    db = re.search(r"dynamic_batching \{[^\n]*\n(?:  [^\n]*\n)*", text)  # the block and its indented lines
    if db is not None:
        if not v.dynamic_batching:
            text = text.replace(db.group(0), "")
        else:
            block = db.group(0)
            if v.preferred is not None:
                pref = ", ".join(str(p) for p in v.preferred)
                block = re.sub(r"preferred_batch_size: \[[^\]]*\] ", f"preferred_batch_size: [ {pref} ] "
                               if v.preferred else "", block)
            if v.queue_delay_us is not None:
                block = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: "
                               f"{v.queue_delay_us}", block)
            text = text.replace(db.group(0), block)
    parse_config(text)
    return text


def write_variant(src: Path, dst: Path, models: list[str], v: Variant) -> Path:
    """Copy `models` (and the graphs the front models call) from repository `src` into `dst`."""
    wanted = set(models) | {g for m in models for g in FRONT_GRAPHS.get(m, ())}
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copyfile(src / REPORT, dst / REPORT)  # the model metadata (graph rows) travels with the models
    for name in sorted(wanted):
        shutil.copytree(src / name, dst / name)
        if name not in FRONT_GRAPHS:  # a graph model
            cfg = dst / name / "config.pbtxt"
            cfg.write_text(rewrite_graph_config(cfg.read_text(), v))
            if v.spinning is not None and "SPINNING_PARAMETER" not in (dst / name / "1" / "model.py").read_text():
                raise ValueError(f"{src / name}: its model.py predates the spinning option; export the "
                                 "repository again (or leave spinning as exported)")
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
