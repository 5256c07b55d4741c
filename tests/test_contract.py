"""The serving contract (biva_core.contract): importable without torch, one source for names, caps and
checks, the same L_K estimator as biva_core.objectives, and generated repository copies equal to sources."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from biva_core import contract, inflight, routing, scoring
from biva_core.contract import Caps, ModelMeta, RequestError
from biva_core.scoring import LogMeanExp, ScoreRequest, heavy_slots, score_blocks
from biva_serving.validate import model_bytes

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("biva_core", "export", "client", "bench", "studies", "serving", "demo")
           for p in (ROOT / d).rglob("*.py")]


def _meta(**kw) -> ModelMeta:
    base = dict(image_shape=(1, 4, 4), likelihood="bernoulli", binarize="threshold", n_layers=3, latent_dim=5,
                noise_dim=7, groups=("z1_bu", "z1_td", "z3"), graph_max_batch=16, checkpoint_sha256="ab" * 32,
                estimator="sample", caps=Caps())
    return ModelMeta(**{**base, **kw})


def _served_core() -> tuple[str, ...]:
    from biva_export.repository import SERVED_CORE

    return SERVED_CORE


def test_contract_imports_without_torch() -> None:
    modules = ", ".join(f"biva_core.{n[:-3]}" for n in _served_core() if n != "__init__.py")
    code = (f"import sys; import {modules}; "
            "print('torch' in sys.modules, 'tritonclient' in sys.modules, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def _project_imports(text: str) -> set[str]:
    """The biva_core modules a file imports ("contract" for `from .contract` or `from biva_core.contract`), and any
    other step of the project it imports (as "biva_export", ...)."""
    found = re.findall(r"^\s*from (?:biva_core)?\.(\w+) import|^\s*(?:from|import) (biva_\w+)", text, re.M)
    return {rel or top for rel, top in found}


def test_the_served_modules_import_nothing_of_the_project() -> None:
    """The biva_core modules copied into the model repository (SERVED_CORE) import each other only."""
    served = {n[:-3] for n in _served_core() if n != "__init__.py"}
    for name in served:
        found = _project_imports((ROOT / "biva_core" / f"{name}.py").read_text())
        assert found <= served - {name}, (name, found)


def test_the_repository_holds_the_modules_the_served_code_imports_and_no_other() -> None:
    """SERVED_CORE is what export/triton_python/ imports of biva_core, transitively: nothing missing, nothing unused."""
    todo = set().union(*(_project_imports(p.read_text()) for p in (ROOT / "export" / "triton_python").glob("*.py")))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        assert (ROOT / "biva_core" / f"{name}.py").exists(), f"the served code imports {name}, not of biva_core"
        seen.add(name)
        todo |= _project_imports((ROOT / "biva_core" / f"{name}.py").read_text()) - seen
    assert sorted(_served_core()) == sorted(["__init__.py", *(f"{n}.py" for n in seen)])


def test_meta_round_trips_and_rejects_foreign_keys() -> None:
    meta = _meta(caps=Caps(max_n=3, max_temperature=2.5))
    assert ModelMeta.from_json(meta.to_json()) == meta
    bad = meta.to_dict()
    bad["graphs"] = {}
    with pytest.raises(ValueError, match="expected keys"):
        ModelMeta.from_json(__import__("json").dumps(bad))
    with pytest.raises(TypeError):
        Caps(**{"max_n": 1, "max_nn": 2})


@pytest.mark.parametrize("batch,graph_rows,iw", [(3, 16, 1), (3, 16, 40), (20, 16, 7), (1, 4, 9)])
def test_log_mean_exp_over_the_plans_blocks_matches_torch(batch, graph_rows, iw) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(batch * 100 + iw)
    log_w = rng.normal(-100, 30, (iw, batch))  # (K, B), spread so the max matters
    blocks = score_blocks(ScoreRequest(iw=iw), batch, graph_rows)
    assert sum(b.count for b in blocks) == iw and all(b.count * batch <= max(graph_rows, batch) for b in blocks)
    lme = LogMeanExp(batch)
    for b in blocks:
        lme.add(log_w[b.start:b.start + b.count])
    ref = (torch.logsumexp(torch.from_numpy(log_w), dim=0) - math.log(iw)).numpy()
    assert np.abs(lme.value() - ref).max() <= 1e-9


@pytest.mark.parametrize("req,batch,rows", [
    (ScoreRequest("mode", 1, 1, (1, 2), False), 4, 16),
    (ScoreRequest("mode", 1, 9, (1,)), 4, 16),
    (ScoreRequest("mean", 6, 3, (1, 2)), 5, 16),
    (ScoreRequest("sample", 1, 40, (0,)), 3, 16),
    (ScoreRequest("mean", 4, 1, ()), 300, 64),
])
def test_score_blocks_cover_each_draw_once_in_stream_order(req, batch, rows) -> None:
    """The mode pass first (zero noise, with ks), then the estimator's draws with ks, then L_K's without: every
    random draw once, in order, at most max(1, rows // batch) draws a block; rows() counts the top-down passes."""
    blocks = score_blocks(req, batch, rows)
    assert [b.mode for b in blocks] == [req.estimator == "mode"] + [False] * (len(blocks) - 1)
    random = [b for b in blocks if not b.mode]
    starts = [b.start for b in random]
    assert starts == sorted(starts) and sum(b.count for b in random) == req.random_draws
    assert all(b.count <= max(1, rows // batch) for b in random)
    assert all(b.with_ks == (b.start < req.stat_draws) for b in random)
    passes = sum(b.count * (1 + (len(req.ks) if b.with_ks else 0)) for b in blocks)
    assert passes * batch == req.rows(batch)


def test_score_requests_are_checked_before_anything_runs() -> None:
    meta = _meta(caps=Caps(max_rows=100, max_samples=8))
    for req, match in ((ScoreRequest("bogus"), "estimator"), (ScoreRequest("mode", samples=4), "samples"),
                       (ScoreRequest("sample", samples=2), "samples"), (ScoreRequest("mean", samples=9), "max_samples"),
                       (ScoreRequest("sample", iw=0), "iw"), (ScoreRequest(ks=(4,)), "ks"),
                       (ScoreRequest("mean", 8, 10, (1, 2)), "max_rows")):
        with pytest.raises(RequestError, match=match):
            req.check(4, meta)
    # K = 10 draws, the first S = 8 with one more pass per k: 26 rows an image, 104 for 4 images (over 100)
    assert ScoreRequest("mean", 8, 10, (1, 2)).check(3, meta).rows(1) == 10 + 8 * 2


def test_graph_and_front_specs_follow_the_output_tuples() -> None:
    meta = _meta()
    for name, spec in meta.graph_specs().items():
        assert tuple(spec.output_names) == contract.GRAPH_OUTPUTS[name]._fields
        assert set(spec.atol) == set(spec.output_names)
    assert set(meta.front_specs()) == set(contract.FRONT_GRAPHS)
    assert {g for gs in contract.FRONT_GRAPHS.values() for g in gs} == set(contract.GRAPHS)


@pytest.mark.parametrize("feeds,match", [
    ({"images": np.full((2, 1, 4, 4), 0.5, np.float32)}, "binary"),
    ({"images": np.full((2, 1, 4, 4), np.nan, np.float32)}, "NaN"),
    ({"z": np.full((2, 5), 3e38, np.float32)}, r"\|value\|"),
    ({"noise": np.full((2, 7), np.inf, np.float32)}, "NaN or Inf"),
    ({"k": np.array([[4]], np.int64)}, "0..3"),
    ({"k": np.array([[-1]], np.int64)}, "0..3"),
    ({"temperature": np.array([[0.0]], np.float32)}, "temperature"),
    ({"temperature": np.array([[np.nan]], np.float32)}, "temperature"),
    ({"temperature": np.array([[1e30]], np.float32)}, "temperature"),
    ({"z": np.zeros((2, 5), np.float32), "k": np.zeros((3, 1), np.int64)}, "row counts"),
    ({"noise": np.zeros((2, 9, 7), np.float32)}, "1 <= B <= 16"),  # the scorer's 2 x 9 rows: over the max batch
    ({"noise": np.zeros((2, 0, 7), np.float32)}, "1 <= B <= 16"),  # no samples
    ({"k": np.zeros((2, 5), np.int64)}, "at most 4"),  # more values of k per row than there are
])
def test_graph_input_checks_refuse(feeds, match) -> None:
    with pytest.raises(RequestError, match=match):
        contract.check_graph_inputs("g", feeds, _meta())


def test_graph_input_checks_accept_good_rows() -> None:
    contract.check_graph_inputs("g", {"images": np.ones((2, 1, 4, 4), np.float32),
                                      "noise": np.zeros((2, 7), np.float32), "k": np.array([[0], [3]])}, _meta())
    contract.check_graph_inputs(contract.SCORER, {"images": np.ones((2, 1, 4, 4), np.float32),  # S = 8, J = 0 and 4
                                                  "noise": np.zeros((2, 8, 7), np.float32),
                                                  "k": np.zeros((2, 0), np.int64)}, _meta())
    contract.check_graph_inputs(contract.SCORER, {"k": np.array([[0, 1, 2, 3]] * 2)}, _meta())


@pytest.mark.parametrize("samples,batch,rows", [(1000, 1, 32), (999, 8, 32), (7, 5, 32), (40, 3, 16), (5, 300, 4),
                                                (3, 2, 1)])
def test_iw_calls_cover_every_sample_of_every_image_once(samples, batch, rows) -> None:
    """The scorer calls of L_K's samples: each (image, sample) once, at most `rows` rows (images x samples) a call,
    as many samples per image as fit (so the stages that see x alone run as few times as the row limit allows)."""
    seen = np.zeros((batch, samples), int)
    calls = scoring.iw_calls(samples, batch, rows)
    for imgs, smp in calls:
        assert (imgs.stop - imgs.start) * (smp.stop - smp.start) <= max(rows, 1) and smp.stop > smp.start
        seen[imgs, smp] += 1
    assert (seen == 1).all()
    assert max(smp.stop - smp.start for _, smp in calls) == min(samples, rows)


def test_scorer_spec_names_its_free_axes_and_bounds_its_bytes() -> None:
    meta = _meta()
    spec = meta.graph_specs()[contract.SCORER]
    free = {t.name: t.free for t in spec.inputs + spec.outputs}
    assert free == {"images": (), "noise": (contract.SAMPLES,), "k": (contract.KS,), "log_w": (contract.SAMPLES,),
                    "log_w_gt_k": (contract.SAMPLES, contract.KS), "kl": (contract.SAMPLES,)}
    assert all(t.dims.count(-1) == len(t.free) for t in spec.inputs + spec.outputs)
    # rows x samples within the max batch; up to L + 1 values of k per row
    assert model_bytes(meta)[contract.SCORER] == 16 * (4 * 16 + 4 * 7 + 8 * 4)


def _non_test_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in SOURCES}


def test_names_and_caps_are_written_once() -> None:
    """Each graph / front model name, parameter name, metadata key and cap is a literal in exactly one non-test
    source (the contract, routing or inflight, or stats for the fitted file's keys)."""
    texts = _non_test_sources()
    quoted = [*contract.GRAPHS, contract.MODEL_PREFIX, contract.META_PARAMETER, contract.DETECTOR_PARAMETER,
              contract.ROLE_PARAMETER, contract.GRAPH_INSTANCES_PARAMETER, routing.ONNX_FILE_PARAMETER,
              routing.THREADS_PARAMETER, routing.SPINNING_PARAMETER, routing.RUNTIME_PARAMETER,
              inflight.CANCEL_DIR_ENV, inflight.TOKEN_PARAMETER]
    caps = [f.name for f in __import__("dataclasses").fields(Caps)]
    for lit in quoted + caps:  # a quoted literal, or (caps) a field declaration such as "max_rows: int"
        pattern = rf"[\"']{lit}[\"']" + (rf"|\b{lit}: " if lit in caps else "")
        where = [p.relative_to(ROOT) for p, t in texts.items() if re.search(pattern, t)]
        assert len(where) == 1, f"{lit!r} is written in {where}"
    # the served metadata's keys: only the contract looks them up (d["key"], d.get("key")); the steps after it
    # read ModelMeta's attributes (the checkpoint format in biva_core, an earlier contract, has keys of its own
    # such as "image_shape", and the CLIs' JSON outputs name their own fields)
    served = {p: t for p, t in texts.items() if p.parent.name != "biva_core" or p.name == "contract.py"}
    for lit in (f.name for f in __import__("dataclasses").fields(ModelMeta)):
        pattern = rf"\[\s*[\"']{lit}[\"']\s*\]|\.get\(\s*[\"']{lit}[\"']"
        where = [str(p.relative_to(ROOT)) for p, t in served.items() if re.search(pattern, t)]
        assert where in ([], ["biva_core/contract.py"]), f"{lit!r} is looked up in {where}"
    for front in (contract.SAMPLE, contract.REGENERATE, contract.ENCODE, contract.SCORE, contract.DETECT):
        assert not [p for p, t in texts.items() if f'"{front}"' in t], front


def test_tensor_names_are_written_once() -> None:
    """Every file that builds or reads a served tensor takes its name from contract.T (JSON / CSV column names
    of the client's outputs and click parameter names are other things and may match)."""
    wire = [ROOT / "client" / "api.py", *(ROOT / "export").rglob("*.py"),
            *(ROOT / "serving").rglob("*.py"), *(ROOT / "bench" / n for n in ("backends.py", "run.py")),
            *(ROOT / "studies" / n for n in ("iw_rows.py", "front_latency.py"))]
    names = [v for k, v in vars(contract.T).items() if not k.startswith("_")]
    assert len(names) == 22
    for p in wire:
        text = p.read_text()
        found = [n for n in names if re.search(rf'(?<![\w{{])"{n}"(?!:\s*\{{)', text)]
        assert not found, f"{p.relative_to(ROOT)} writes tensor names {found}; use contract.T"


def _generated_copies(root: Path) -> dict[Path, Path]:
    """Every python file biva-export copied into repository `root` -> the source file it must equal."""
    from biva_export.repository import CORE_DIR, PYTHON_DIR, SERVED_CORE

    out = {}
    for model_py in sorted(root.glob("*/1/model.py")):
        graph = routing.ONNX_FILE_PARAMETER in (model_py.parent.parent / "config.pbtxt").read_text()
        out[model_py] = PYTHON_DIR / ("graph_model.py" if graph else "front_model.py")
        out.update({model_py.parent / "biva_core" / n: CORE_DIR / n for n in SERVED_CORE})
    return out


def test_generated_copies_equal_their_sources(tiny_repo) -> None:
    """The repository's model code and biva_core modules, in the repository this test run exported."""
    from biva_export.repository import SERVED_CORE

    copies = _generated_copies(tiny_repo)
    assert len(copies) == 7 * (1 + len(SERVED_CORE))  # 4 front models and 3 graph models
    for copy, source in copies.items():
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}"


def test_git_keeps_only_the_repositorys_readme() -> None:
    """triton_models/ is generated by biva-export: only its README is tracked."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "triton_models"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["triton_models/README.md"]


STEPS = ["biva_core", "biva_export", "biva_serving", "biva_client", "biva_bench", "biva_demo"]  # data-flow order
FOLDERS = {"biva_core": "biva_core", "biva_export": "export", "biva_serving": "serving", "biva_client": "client",
           "biva_bench": "bench", "biva_demo": "demo"}


def test_no_step_imports_a_later_one() -> None:
    for i, step in enumerate(STEPS[:-1]):
        later = [s for s in STEPS[i + 1:] if not (step == "biva_bench" and s == "biva_demo")]
        for p in (ROOT / FOLDERS[step]).rglob("*.py"):
            bad = [s for s in later if re.search(rf"^\s*(from|import) {s}\b", p.read_text(), re.M)]
            assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_heavy_requests_leave_an_instance_of_the_model_and_of_the_scorer_to_small_ones() -> None:
    assert heavy_slots(2, 2) == 1  # the tests' layout: one heavy request at a time
    assert heavy_slots(4, 2) == 1  # the default on 2 cores: more front instances admit no more heavy requests
    assert heavy_slots(8, 4) == 3 and heavy_slots(3, 8) == 2
    assert heavy_slots(1, 2) == heavy_slots(4, 1) == 1  # at least one, even where nothing can be left over
