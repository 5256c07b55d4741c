"""The install: ONNX Runtime as one of two conflicting extras, the CPU one what `make install` takes."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()


def test_onnxruntime_is_an_extra_cpu_or_gpu_never_both():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, "ONNX Runtime in the base install would conflict with gpu"
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    assert not any(n.startswith("nvidia-") and n != "nvidia-pytriton" for n in base | extras["gpu"]), \
        "CUDA wheels must not come with the package (onnxruntime-gpu finds the system's CUDA)"


def test_make_install_takes_the_cpu_extra_and_it_is_installed():
    import onnxruntime

    assert re.search(r"pip install -q -e '\.\[cpu,test\]'", (ROOT / "Makefile").read_text())
    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
