"""Study: the README's OOD table through the served path, every estimator and score.
Fed: README.md's OOD table, docs/ood.md.

The OOD table of the README, through the served path: every estimator x every score (every k), the fitted
detector, against each OOD set, with the served seconds per image of each estimator.

    python -m studies.ood_table --ckpt models/ood28.pt --out docs/ood_estimators.json

Exports CKPT (with its fitted detector, CKPT.detector.json, where there is one) into a temporary repository, starts
tritonserver, and scores `--limit` images of the in-distribution set and of each OOD set with biva-client's library
(the same requests `biva-client ood score` sends, batch i with seed i), for the estimators sample, mean with S =
4 and 16, mode, and the reference's mix (the importance-weighted L_K over S draws with mode's L^{>k}: LLRK>k of a
mode request with iw = S). Writes the metrics as JSON and a markdown table beside it.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from biva_core.scoring import ScoreRequest
from biva_core.stats import score_order

ROWS = {  # label -> the request (ks filled in per model)
    "sample": ScoreRequest("sample", 1, 1, (), False),
    "mean, S = 4": ScoreRequest("mean", 4, 1, (), False),
    "mean, S = 16": ScoreRequest("mean", 16, 1, (), False),
    "mode": ScoreRequest("mode", 1, 1, (), False),
    "mix: L_16 - mode L^{>k}": ScoreRequest("mode", 1, 16, (), True),
}


def _score_sets(client, sets: dict, req: ScoreRequest, job) -> tuple[dict, float]:
    """Every set's scores by `req`, and the served seconds per image over all of them."""
    from biva_client.tasks import score_images

    t = time.perf_counter()
    scores = {name: score_images(client, x, job, req, desc=name).scores() for name, x in sets.items()}
    return scores, (time.perf_counter() - t) / sum(len(x) for x in sets.values())


def run_table(ckpt: Path, in_spec: str, ood_specs: tuple[str, ...], limit: int, log=print) -> dict:
    from biva_client.api import BivaClient
    from biva_client.tasks import Job, detect_images, load_inputs
    from biva_core.stats import detection_table
    from biva_export.pipeline import run_export
    from biva_serving.process import start_server

    out = {"checkpoint": str(ckpt), "in": in_spec, "limit": limit, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="biva-ood-table-") as tmp:
        repo = Path(tmp) / "repo"
        run_export(ckpt, repo, log=lambda *_: None, source=str(ckpt))
        with start_server(repo, log_path=Path(tmp) / "server.log") as server, \
                BivaClient(server.grpc_url, "grpc", timeout=600) as client:
            ks = tuple(range(1, client.meta.n_layers))
            job = Job(0, 100, 2, False)
            sets = {s: load_inputs(s, client.meta, limit) for s in (in_spec, *ood_specs)}
            for label, base in ROWS.items():
                req = ScoreRequest(base.estimator, base.samples, base.iw, ks, base.want_iw)
                scores, s_per_image = _score_sets(client, sets, req, job)
                keep = (lambda n: n.startswith("LLRK")) if base.iw > 1 else (lambda n: not n.startswith("LLRK"))
                out["rows"][label] = {"request": req.__dict__, "served_s_per_image": s_per_image, "sets": {
                    o: {n: m for n, m in detection_table(scores[in_spec], scores[o]).items() if keep(n) and n != "LK"}
                    for o in ood_specs}}
                log(f"{label}: {s_per_image * 1e3:.1f} ms per image")
            if _served(client):
                t = time.perf_counter()
                det = {s: {"detector": detect_images(client, x, job)[0]} for s, x in sets.items()}
                out["rows"]["detector"] = {"request": client.detector(), "served_s_per_image": (
                    time.perf_counter() - t) / sum(len(x) for x in sets.values()), "sets": {
                    o: detection_table(det[in_spec], det[o]) for o in ood_specs}}
    return out


def _served(client) -> bool:
    from biva_client.api import ClientError

    try:
        client.ensure_ready("detect")
        return True
    except ClientError:
        return False


def markdown(table: dict) -> str:
    """One row per estimator, a column per OOD set and score: AUROC (FPR at 95% TPR)."""
    lines = []
    for ood in next(iter(table["rows"].values()))["sets"]:
        names = sorted({n for r in table["rows"].values() for n in r["sets"][ood]}, key=score_order)
        lines += [f"AUROC (FPR at 95% TPR), {table['in']} vs {ood}, {table['limit']} images each:", "",
                  "| estimator | " + " | ".join(names) + " | served ms / image |",
                  "|---" * (len(names) + 2) + "|"]
        for label, r in table["rows"].items():
            cells = [f"{r['sets'][ood][n]['auroc']:.3f} ({r['sets'][ood][n]['fpr95']:.2f})"
                     if n in r["sets"][ood] else "" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['served_s_per_image'] * 1e3:.1f} |")
        lines.append("")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=Path("models/ood28.pt"),
              show_default=True, help="Checkpoint (and its CKPT.detector.json, when there is one).")
@click.option("--in", "in_spec", default="fashion-mnist:test", show_default=True, help="In-distribution data.")
@click.option("--ood", "ood_specs", multiple=True, default=("mnist", "digits"), show_default=True,
              help="OOD data (repeatable).")
@click.option("--limit", default=1000, show_default=True, help="Images per set.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/ood_estimators.json"),
              show_default=True, help="JSON output; the markdown table goes beside it (.md).")
def main(ckpt, in_spec, ood_specs, limit, out):
    """Every estimator x score x OOD set through the served path, and the detector."""
    table = run_table(ckpt, in_spec, tuple(ood_specs), limit, log=click.echo)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(table) + "\n")
    click.echo(markdown(table))


if __name__ == "__main__":
    main()
