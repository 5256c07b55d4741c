"""biva-export and the served repository: configs, validation, atomic replacement, and a real tritonserver
answering over HTTP and gRPC with the numbers PyTorch gives for the same seeds."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tritonclient.utils import InferenceServerException

from biva_core.checkpoint import load_model
from biva_core.config import preset
from biva_core.model import Biva
from biva_core.noise import NoiseStream
from biva_core.objectives import evaluate_bounds, evaluate_request
from biva_core.contract import REPORT, Caps, ModelMeta, front_specs
from biva_core.routing import AOTI_SLICE_ROWS
from biva_core.scoring import ScoreRequest
from biva_export.pipeline import ExportConfig, ExportError, run_export
from biva_export.graphs import graph_specs
from biva_export.serving_config import ServingConfig
from biva_export.repository import front_config, graph_config, parse_config
from serving_helpers import i64, infer

torch.set_num_threads(1)
NATS_TOL = 1e-3  # per image, PyTorch vs Triton
IMAGE_TOL = 1e-4


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


ONNX_ONLY = ServingConfig(runtime="onnxruntime")  # exports in seconds (the aoti route: tests/test_aoti.py)


# ---- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_every_generated_config_parses_into_model_config(backend):
    model = Biva(preset("tiny"))
    for spec in graph_specs(model).values():
        sc = ServingConfig(backend=backend, max_batch=512, instances=2, threads=1, preferred=(64, 256, 1024),
                           queue_delay_us=1000)
        cfg = parse_config(graph_config(spec, sc))
        assert cfg.name == spec.name and cfg.max_batch_size == 512
        assert [i.name for i in cfg.input] == spec.input_names
        assert [o.name for o in cfg.output] == spec.output_names
        assert list(cfg.dynamic_batching.preferred_batch_size) == [64, 256]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000
        if backend == "onnxruntime":
            assert cfg.platform == "onnxruntime_onnx" and cfg.instance_group[0].kind == 1  # KIND_GPU
            assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
        else:
            assert cfg.backend == "python" and cfg.instance_group[0].count == 2
    scorer = graph_specs(model)["biva_graph_scorer"]
    default = parse_config(graph_config(scorer, ServingConfig(max_batch=64, threads=1)))
    # a front's calls reach both instances: no wait, and merged only up to a full slice
    assert list(default.dynamic_batching.preferred_batch_size) == [AOTI_SLICE_ROWS]
    assert default.dynamic_batching.max_queue_delay_microseconds == 0
    assert default.parameters["intra_op_spinning"].string_value == "0"  # served threads sleep when idle
    no_pref = parse_config(graph_config(scorer, ServingConfig(max_batch=64, preferred=())))
    assert list(no_pref.dynamic_batching.preferred_batch_size) == []
    # two instances by default (Triton 2.51's batcher stalls a lone instance with a queue policy for 0.5 s)
    assert no_pref.instance_group[0].count == 2 and no_pref.dynamic_batching.default_queue_policy.max_queue_size > 0
    spin = parse_config(graph_config(graph_specs(model)["biva_graph_scorer"], ServingConfig(spinning=True)))
    assert spin.parameters["intra_op_spinning"].string_value == "1"
    meta = ModelMeta((1, 28, 28), "bernoulli", "threshold", model.cfg.n_layers, model.latent_dim, model.noise_dim,
                     tuple(model.group_names()), 64, "cd" * 32, "sample", Caps(max_n=7))
    for spec in front_specs((1, 28, 28), model.latent_dim, len(model.groups)).values():
        cfg = parse_config(front_config(spec, meta, ServingConfig(front_instances=2, instances=3)))
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 8  # 4 waiting per instance
        default = parse_config(front_config(spec, meta, ServingConfig()))
        assert default.instance_group[0].count == 4
        assert default.dynamic_batching.default_queue_policy.max_queue_size == 16
        assert cfg.parameters["graph_instances"].string_value == "3"  # the front splits its calls over them
        assert cfg.backend == "python" and cfg.max_batch_size == 0
        assert {i.name for i in cfg.input if i.optional} == set(spec.optional)
        assert ModelMeta.from_json(cfg.parameters["biva_meta"].string_value) == meta


# ---- export ---------------------------------------------------------------------------------------

def test_export_report_and_layout(tiny_repo):
    report = json.loads((tiny_repo / REPORT).read_text())
    assert report["validated"] and report["opset"] == 18
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert report["elu"] == "decomposed"  # the python backend's default (ONNX Runtime's CPU provider)
    for name in ("biva_graph_sampler", "biva_graph_encoder", "biva_graph_scorer"):
        g = report["graphs"][name]
        assert g["ok"] and all(g["max_abs_diff"][k] <= g["atol"][k] for k in g["atol"])
        path = tiny_repo / name / "1" / "model.onnx"
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        ops = [n.op_type for n in proto.graph.node]
        assert "Elu" not in ops and ops.count("Exp") >= 2, name
        parse_config((tiny_repo / name / "config.pbtxt").read_text())
        assert (tiny_repo / name / "1" / "model.py").exists()
    for name in ("biva_sample", "biva_regenerate", "biva_encode", "biva_score"):
        parse_config((tiny_repo / name / "config.pbtxt").read_text())
    assert not list(tiny_repo.parent.glob(".triton_models.*"))  # no staging left behind


def test_failed_validation_leaves_previous_repository_intact(tiny_ckpt, tiny_repo, tmp_path):
    repo = tmp_path / "triton_models"
    shutil.copytree(tiny_repo, repo)
    before = _tree_digest(repo)
    with pytest.raises(ExportError) as e:
        run_export(tiny_ckpt, repo, ExportConfig(atol_scale=0.0, serving=ONNX_ONLY), log=lambda *_: None)
    msg = str(e.value)
    assert "validation failed" in msg and "left untouched" in msg and "biva_graph_sampler: max |ORT - torch|" in msg
    assert " > 0" in msg
    assert _tree_digest(repo) == before
    assert not list(tmp_path.glob(".triton_models.*"))


def test_export_refuses_a_foreign_directory(tiny_ckpt, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not written by biva-export"):
        run_export(tiny_ckpt, foreign, ExportConfig(validate=False, serving=ONNX_ONLY), log=lambda *_: None)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_export_writes_into_the_folder_a_fresh_clone_has_and_keeps_its_readme(tiny_ckpt, tmp_path):
    """A fresh clone's triton_models/ holds only the README git keeps: biva-export writes the repository there
    (no --force), twice, and the README is the same file after each (make demo leaves git status clean)."""
    repo = tmp_path / "triton_models"
    repo.mkdir()
    shutil.copy2(Path(__file__).resolve().parent.parent / "triton_models" / "README.md", repo / "README.md")
    readme = (repo / "README.md").read_bytes()
    for _ in range(2):
        run_export(tiny_ckpt, repo, ExportConfig(validate=False, serving=ONNX_ONLY), log=lambda *_: None)
        assert (repo / REPORT).is_file() and (repo / "biva_graph_scorer" / "1" / "model.onnx").is_file()
        assert (repo / "README.md").read_bytes() == readme


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_graph_numbers(tiny_ckpt, tmp_path):
    from biva_export.graphs import inference_copy
    from biva_export.onnx_export import export_graph, validate_graph

    model, _ = load_model(tiny_ckpt)
    spec = graph_specs(model)["biva_graph_sampler"]
    export_graph(spec, inference_copy(model), tmp_path / "s.onnx", exporter="dynamo")
    rep = validate_graph(spec, model, tmp_path / "s.onnx")
    assert rep.ok, rep.summary()


@pytest.mark.slow
def test_compiled_graphs_match_eager_on_fresh_inputs():
    """torch.compile (inductor, CPU) of the three graph modules ONNX Runtime runs, as biva-bench compiles them,
    against eager on fresh random inputs: max |compiled - eager| <= the export tolerance of each output
    (1e-4 images and latents, 1e-3 nats), raised to two float32 spacings of the output as validation does."""
    from biva_bench.backends import CompiledRunner, TorchRunner
    from biva_export.graphs import GRAPH_MODULES, inference_copy
    from biva_export.onnx_export import example_inputs

    torch.manual_seed(3)
    plain = inference_copy(Biva(preset("tiny")))
    for name, spec in graph_specs(plain).items():
        eager = TorchRunner(GRAPH_MODULES[name](plain), spec)
        compiled = CompiledRunner(GRAPH_MODULES[name](plain), spec)
        # 64 rows: the quick bench's shape, so a test session compiles it once (inductor's on-disk cache)
        feeds = example_inputs(spec, plain, 64, seed=int(np.random.default_rng().integers(2**31)))
        got, ref = compiled(compiled.prepare(feeds)), eager(eager.prepare(feeds))
        assert set(compiled.compile_s) == {"64"} and compiled.compile_s["64"] > 0, name
        for out, g, r in zip(spec.output_names, got, ref):
            tol = max(spec.atol[out], 2.0 * float(np.spacing(np.float32(np.abs(r).max()))))
            assert g.shape == r.shape and float(np.abs(g - r).max()) <= tol, (name, out, float(np.abs(g - r).max()))


def test_cli_failure_is_one_line_and_nonzero(tiny_ckpt, tmp_path):
    from click.testing import CliRunner

    from biva_export.cli import main

    res = CliRunner().invoke(main, ["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no such checkpoint file" in res.output
    assert len(res.output.strip().splitlines()) == 1


# ---- the live server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def tiny_images(tiny):
    from biva_core.data import load_for_model
    return load_for_model("digits", tiny[1], limit=6)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sample_with_seed_is_reproducible_and_matches_pytorch(tiny_server, tiny, protocol):
    model, _ = tiny
    a, s = infer(tiny_server, protocol, "biva_sample", {"n": i64(5), "seed": i64(123)}, ["images", "seed"])
    b, _ = infer(tiny_server, protocol, "biva_sample", {"n": i64(5), "seed": i64(123)}, ["images", "seed"])
    assert np.array_equal(a, b) and s[0] == 123  # one computation twice (same noise, rows, graph): equal
    with torch.no_grad():
        ref = model.sample(NoiseStream(123).take((5, model.latent_dim))).x_mean.numpy()
    assert np.abs(a - ref).max() <= IMAGE_TOL
    t = np.array([0.5], np.float32)
    c, _ = infer(tiny_server, protocol, "biva_sample", {"n": i64(5), "seed": i64(123), "temperature": t},
                  ["images", "seed"])
    with torch.no_grad():
        ref_t = model.sample(NoiseStream(123).take((5, model.latent_dim)), 0.5).x_mean.numpy()
    assert np.abs(c - ref_t).max() <= IMAGE_TOL and not np.allclose(c, a)


@pytest.mark.server
def test_a_front_request_runs_its_halves_on_both_graph_instances(tiny_server):
    """biva_sample splits 64 images into two 32-image calls, one per graph instance, sent at once; the graph
    models' preferred batch size keeps the dynamic batcher from merging them into one instance's batch (which
    it did for a quarter of such requests without it, leaving the other instance idle)."""
    import tritonclient.http as thttp

    c = thttp.InferenceServerClient(tiny_server.http_url)

    def counts():
        s = c.get_inference_statistics("biva_graph_sampler")["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])
    try:
        before = counts()
        for seed in range(12):
            images, = infer(tiny_server, "grpc", "biva_sample", {"n": i64(64), "seed": i64(seed)}, ["images"])
            assert images.shape[0] == 64
        rows, executions = (a - b for a, b in zip(counts(), before))
    finally:
        c.close()
    assert (rows, executions) == (12 * 64, 12 * 2)


@pytest.mark.server
def test_unseeded_requests_vary_and_report_their_seed(tiny_server, tiny):
    a, sa = infer(tiny_server, "http", "biva_sample", {"n": i64(3)}, ["images", "seed"])
    b, sb = infer(tiny_server, "http", "biva_sample", {"n": i64(3)}, ["images", "seed"])
    assert sa[0] != sb[0] and not np.array_equal(a, b)
    again, _ = infer(tiny_server, "grpc", "biva_sample", {"n": i64(3), "seed": sa}, ["images", "seed"])
    assert np.array_equal(a, again)  # the same seed: the same computation again, equal by construction


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_score_matches_pytorch(tiny_server, tiny, tiny_images, protocol):
    model, _ = tiny
    ks = [0, 1, 3]
    x = tiny_images
    elbo, iw, lgk, kl = infer(tiny_server, protocol, "biva_score",
                               {"images": x, "iw": i64(40), "ks": i64(ks), "seed": i64(9)},
                               ["elbo", "iw_bound", "l_gt_k", "kl"])
    ref = evaluate_bounds(model, torch.from_numpy(x), NoiseStream(9), 40, tuple(ks))
    assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_TOL
    assert np.abs(iw - ref.iw.numpy()).max() <= NATS_TOL
    for j, k in enumerate(ks):
        assert np.abs(lgk[:, j] - ref.l_gt_k[k].numpy()).max() <= NATS_TOL
    assert np.abs(kl - ref.kl.numpy()).max() <= NATS_TOL
    # L^{>0} and L_1 are the same bound from two top-down passes over different row counts: equal up to the
    # kernels' rounding, which differs by processor (one float32 spacing on a Zen 4), so compared within the tolerance
    assert np.abs(lgk[:, 0] - elbo).max() <= NATS_TOL
    assert (iw >= elbo - np.log(40)).all()


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("req", [ScoreRequest("sample", 1, 5, (1, 3)), ScoreRequest("mean", 6, 4, (0, 2)),
                                 ScoreRequest("mode", 1, 3, (1, 2, 3))], ids=["sample", "mean", "mode"])
def test_every_estimator_matches_pytorch(tiny_server, tiny, tiny_images, protocol, req):
    """biva_score with each estimator (its name a BYTES input, S a second input) against evaluate_request on fresh
    images and a fresh seed, within NATS_TOL per image for L_1, every L^{>k}, the KL and L_K."""
    model, _ = tiny
    rng = np.random.default_rng()
    x = (rng.random((4, *tiny_images.shape[1:])) < rng.uniform(0.1, 0.5)).astype(np.float32)  # fresh binary images
    seed = int(rng.integers(2**62))
    inputs = {"images": x, "iw": i64(req.iw), "ks": i64(list(req.ks)), "seed": i64(seed), "samples": i64(req.samples),
              "estimator": np.array([req.estimator.encode()], dtype=object)}
    elbo, iw, lgk, kl = infer(tiny_server, protocol, "biva_score", inputs, ["elbo", "iw_bound", "l_gt_k", "kl"])
    ref = evaluate_request(model, torch.from_numpy(x), NoiseStream(seed), req)
    assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_TOL
    assert np.abs(iw - ref.iw.numpy()).max() <= NATS_TOL
    assert np.abs(kl - ref.kl.numpy()).max() <= NATS_TOL
    for j, k in enumerate(req.ks):
        assert np.abs(lgk[:, j] - ref.l_gt_k[k].numpy()).max() <= NATS_TOL


@pytest.mark.server
def test_iw_over_many_graph_slices(tiny_server, tiny, tiny_images):
    """K x B rows far above the graph's max batch (64): the front model slices, the bound is unchanged."""
    model, _ = tiny
    x = tiny_images[:2]
    (iw,) = infer(tiny_server, "grpc", "biva_score", {"images": x, "iw": i64(200), "seed": i64(1)}, ["iw_bound"])
    ref = evaluate_bounds(model, torch.from_numpy(x), NoiseStream(1), 200, chunk=7)
    assert np.abs(iw - ref.iw.numpy()).max() <= NATS_TOL


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_encode_then_regenerate_bottom_layers(tiny_server, tiny, tiny_images, protocol):
    model, _ = tiny
    x = tiny_images
    z, mu, log_std, kl = infer(tiny_server, protocol, "biva_encode", {"images": x, "seed": i64(5)},
                                ["z", "q_mu", "q_log_std", "kl"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), NoiseStream(5).take((len(x), model.noise_dim)))
    assert np.abs(z - ref.z.numpy()).max() <= IMAGE_TOL and np.abs(mu - ref.q_mu.numpy()).max() <= IMAGE_TOL
    assert np.abs(kl - ref.kl.numpy()).max() <= NATS_TOL
    for k in (1, 2):  # k < L: the top layers come from the encoder
        (img,) = infer(tiny_server, protocol, "biva_regenerate", {"z": z, "k": i64(k), "seed": i64(8)}, ["images"])
        with torch.no_grad():
            r = model.regenerate(torch.from_numpy(z), k, NoiseStream(8).take((len(x), model.latent_dim)))
        assert np.abs(img - r.x_mean.numpy()).max() <= IMAGE_TOL
        kept = [g for g in model.groups if g.level > k]
        assert all(torch.equal(r.z[:, g.offset:g.offset + g.size], torch.from_numpy(z)[:, g.offset:g.offset + g.size])
                   for g in kept)


BAD_REQUESTS = [
    ("biva_sample", {"n": i64(0)}, "n: got 0"),
    ("biva_sample", {"n": i64(10**6)}, "n: got 1000000"),
    ("biva_sample", {"n": i64(2), "temperature": np.array([0.0], np.float32)}, "temperature: got 0"),
    ("biva_sample", {"n": i64(2), "temperature": np.array([np.nan], np.float32)}, "temperature: got nan"),
    ("biva_sample", {"n": i64(2), "seed": i64(-3)}, "seed: expected an integer in 0..2^63-1, got -3"),
    ("biva_score", {"images": np.full((2, 1, 28, 28), 0.5, np.float32)}, "images: this model is binary"),
    ("biva_score", {"images": np.full((2, 1, 28, 28), 2.0, np.float32)}, "images: values in [2, 2]"),
    ("biva_score", {"images": np.full((2, 1, 28, 28), np.inf, np.float32)}, "images: contains NaN or Inf"),
    # Triton checks declared shapes itself, before the model runs: its message names the input and shape
    ("biva_score", {"images": np.zeros((2, 1, 32, 32), np.float32)}, "'images' for model 'biva_score'. Expected [-1,1,28,28]"),
    ("biva_score", {"images": np.zeros((2, 28, 28), np.float32)}, "images"),
    ("biva_score", {"images": np.zeros((2, 1, 28, 28), np.float32), "ks": i64([0, 99])}, "ks: got [0, 99]"),
    ("biva_score", {"images": np.zeros((2, 1, 28, 28), np.float32), "iw": i64(0)}, "iw: got 0"),
    ("biva_score", {"images": np.zeros((300, 1, 28, 28), np.float32), "iw": i64(5000)}, "over the cap max_rows"),
    ("biva_regenerate", {"z": np.zeros((2, 3), np.float32), "k": i64(1)}, "Expected [-1,22]"),
    ("biva_regenerate", {"z": np.zeros((2, 22), np.float32), "k": i64(7)}, "k: got 7"),
]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(tiny_server, tiny, protocol):
    model, _ = tiny
    assert model.latent_dim == 22  # the regenerate case above uses the tiny model's D
    for name, inputs, expected in BAD_REQUESTS:
        with pytest.raises(InferenceServerException) as e:
            infer(tiny_server, protocol, name, inputs, ["seed", "iw_bound"] if name == "biva_score" else ["seed"])
        assert expected in e.value.message(), (name, e.value.message())
        good, _ = infer(tiny_server, protocol, "biva_sample", {"n": i64(2), "seed": i64(4)}, ["images", "seed"])
        assert good.shape == (2, 1, 28, 28) and np.isfinite(good).all()


# ---- the shipped default model ---------------------------------------------------------------------

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "models" / "default28.pt"


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="models/default28.pt not present")
def test_default_model_exports_and_serves(tmp_path):
    from biva_core.data import load_for_model
    from biva_serving.process import start_server

    repo = tmp_path / "triton_models"
    report = run_export(DEFAULT_CKPT, repo, ExportConfig(serving=ServingConfig(threads=1, runtime="onnxruntime")), log=lambda *_: None)
    assert all(g["ok"] for g in report["graphs"].values())
    model, meta = load_model(DEFAULT_CKPT)
    x = load_for_model("fashion-mnist:test", meta, limit=8)
    with start_server(repo, log_path=tmp_path / "server.log") as server:
        imgs, _ = infer(server, "grpc", "biva_sample", {"n": i64(4), "seed": i64(2)}, ["images", "seed"])
        with torch.no_grad():
            ref = model.sample(NoiseStream(2).take((4, model.latent_dim))).x_mean.numpy()
        assert np.abs(imgs - ref).max() <= IMAGE_TOL
        elbo, iw, lgk = infer(server, "http", "biva_score",
                               {"images": x, "iw": i64(16), "ks": i64([0, 2]), "seed": i64(3)},
                               ["elbo", "iw_bound", "l_gt_k"])
        ref = evaluate_bounds(model, torch.from_numpy(x), NoiseStream(3), 16, (0, 2))
        assert np.abs(elbo - ref.elbo.numpy()).max() <= NATS_TOL
        assert np.abs(iw - ref.iw.numpy()).max() <= NATS_TOL
        assert np.abs(lgk[:, 1] - ref.l_gt_k[2].numpy()).max() <= NATS_TOL
        assert server.stop() == 0


@pytest.mark.slow
def test_export_killed_mid_write_leaves_previous_repository_served(tiny_ckpt, tiny_repo, tmp_path):
    """SIGKILL biva-export while it writes: the old repository is intact and still serves; the next
    export cleans the dead staging folder up."""
    import signal
    import subprocess
    import sys
    import time

    from biva_serving.process import start_server

    repo = tmp_path / "triton_models"
    shutil.copytree(tiny_repo, repo)
    before = _tree_digest(repo)
    proc = subprocess.Popen([sys.executable, "-m", "biva_export.cli", "--ckpt", str(tiny_ckpt), "--out", str(repo),
                             "--no-validate"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".triton_models.staging-*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _tree_digest(repo) == before
    # the served code imports the biva_core copied beside it, not the one installed in this Python
    copy = repo / "biva_sample" / "1" / "biva_core" / "contract.py"
    copy.write_text(copy.read_text().replace("(cap {cap_name})", "(cap {cap_name}; the repository's copy)"))
    with start_server(repo, log_path=tmp_path / "server.log") as server:
        imgs, _ = infer(server, "http", "biva_sample", {"n": i64(2), "seed": i64(1)}, ["images", "seed"])
        assert imgs.shape == (2, 1, 28, 28)
        with pytest.raises(InferenceServerException, match="the repository's copy"):
            infer(server, "http", "biva_sample", {"n": i64(0)}, ["images"])
        server.stop()
    run_export(tiny_ckpt, repo, ExportConfig(validate=False, serving=ONNX_ONLY), log=lambda *_: None)
    assert not list(tmp_path.glob(".triton_models.staging-*"))
