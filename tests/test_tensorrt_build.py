"""TensorRT: the pure builder settings and trtexec line, mypy against tensorrt-stubs, a GPU build."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cmc_export import tensorrt_build
from cmc_export.tensorrt_build import (
    builder_settings,
    profile_shapes,
    tensorrt_unavailable_reason,
    trtexec_command,
)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "cmc_export" / "tensorrt_build.py"


def test_profile_shapes_span_one_to_max_on_the_batch_axis() -> None:
    shapes = profile_shapes(32, 8)
    assert shapes.min == (1, 1, 32, 32, 32)
    assert shapes.opt == (4, 1, 32, 32, 32)
    assert shapes.max == (8, 1, 32, 32, 32)
    assert profile_shapes(32, 1).opt[0] == 1
    assert profile_shapes(32, 8, opt_batch=2).opt[0] == 2
    with pytest.raises(ValueError, match="max_batch"):
        profile_shapes(32, 0)
    with pytest.raises(ValueError, match="opt batch 9"):
        profile_shapes(32, 8, opt_batch=9)


def test_builder_settings_describe_fp16_profile_and_cache(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    settings = builder_settings("fp16", 16, 4, ["image_a", "image_b"], cache)
    assert settings["flags"] == ["FP16"]
    assert settings["profile"]["image_b"] == {"min": [1, 1, 16, 16, 16], "opt": [2, 1, 16, 16, 16],
                                              "max": [4, 1, 16, 16, 16]}
    assert settings["timing_cache"] == str(cache)
    assert builder_settings("fp32", 16, 4, ["image_a"], None)["flags"] == []
    with pytest.raises(ValueError, match="bf16"):
        builder_settings("bf16", 16, 4, ["image_a"], None)


def test_trtexec_command_matches_the_builder(tmp_path: Path) -> None:
    line = trtexec_command(Path("model dir/fused_fp32.onnx"), Path("out/fused_fp16.plan"),
                           ["image_a", "image_b"], 32, 8, "fp16", Path("out/timing.cache"))
    argv = shlex.split(line)
    assert argv[0] == "trtexec" and "--onnx=model dir/fused_fp32.onnx" in argv
    assert "--saveEngine=out/fused_fp16.plan" in argv
    assert "--minShapes=image_a:1x1x32x32x32,image_b:1x1x32x32x32" in argv
    assert "--optShapes=image_a:4x1x32x32x32,image_b:4x1x32x32x32" in argv
    assert "--maxShapes=image_a:8x1x32x32x32,image_b:8x1x32x32x32" in argv
    assert "--fp16" in argv and "--timingCacheFile=out/timing.cache" in argv
    assert "--memPoolSize=workspace:4096" in argv
    assert "--fp16" not in shlex.split(trtexec_command(Path("a.onnx"), Path("a.plan"),
                                                       ["image_a"], 32, 8, "fp32"))


def _clean_stubs(out: Path) -> Path:
    """A copy of the installed tensorrt-stubs that mypy can analyse; returns a mypy config.

    The generated stubs ship without py.typed, use `in` as a parameter name, put required
    parameters after defaulted ones, import an absent `tensorrt_libs`, re-export names
    implicitly and shadow `bool` with a DataType constant. Methods whose signature is not
    valid Python get `(*args, **kwargs)` (none of them is used by tensorrt_build.py); every
    other signature is kept verbatim, so the API we call is checked.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    for package in ("tensorrt", "tensorrt_bindings"):
        for stub in (site / package).glob("*.pyi"):
            lines = []
            for line in stub.read_text().splitlines():
                text = line.strip()
                if "tensorrt_libs" in line or line.startswith("bool: "):
                    continue
                reexport = re.match(r"from (tensorrt\S*) import (\w+)$", line)
                if reexport:
                    line = f"from {reexport[1]} import {reexport[2]} as {reexport[2]}"
                if text.startswith("def "):
                    try:
                        ast.parse(text + " ...")
                    except SyntaxError:
                        indent = line[: len(line) - len(line.lstrip())]
                        name, returns = text[4:text.index("(")], text[text.rindex(")") + 1:]
                        line = (f"{indent}def {name}(self, *args: typing.Any, "
                                f"**kwargs: typing.Any){returns}")
                lines.append(line)
            (out / package).mkdir(parents=True, exist_ok=True)
            (out / package / stub.name).write_text("\n".join(lines) + "\n")
    config = out / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {out}\ncache_dir = {out / '.mypy_cache'}\n"
                      "[mypy-tensorrt.*,tensorrt_bindings.*]\nignore_errors = True\n")
    return config


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.skipif(not (Path(sysconfig.get_paths()["purelib"]) / "tensorrt_bindings").is_dir(),
                    reason="tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
def test_tensorrt_build_type_checks_against_tensorrt_stubs(tmp_path: Path) -> None:
    config = _clean_stubs(tmp_path / "stubs")
    checked = _mypy("--config-file", str(config), "--strict", str(MODULE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The stubs really are in use: a wrong argument type to the builder API is caught.
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MODULE.read_text().replace("config.set_flag(trt.BuilderFlag.FP16)",
                                                 'config.set_flag("FP16")'))
    caught = _mypy("--config-file", str(config), str(misuse))
    assert caught.returncode == 1 and 'incompatible type "str"' in caught.stdout


def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(tensorrt_build.ExportError, match="fused_fp16.plan: cannot build a "
                                                         "TensorRT engine: "):
        tensorrt_build.build_engine(tmp_path / "fused_fp32.onnx", tmp_path / "fused_fp16.plan",
                                    ["image_a", "image_b"], 16, 4)


@pytest.mark.gpu
def test_build_real_engine_and_gate_it(tmp_path: Path) -> None:
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {reason}")
    import json

    import numpy as np
    import onnx
    from export_fixtures import MICRO, micro_net

    from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
    from cmc_export.patch_graph import patch_graph

    model = trace_to_onnx(patch_graph(micro_net(), "a"), "a", MICRO.img_size)
    onnx_path = tmp_path / "a_fp32.onnx"
    onnx.save_model(model, str(onnx_path))
    plan = tmp_path / "a_fp16.plan"
    record = tensorrt_build.build_engine(onnx_path, plan, ["image_a"], MICRO.img_size, 4, "fp16",
                                         timing_cache=tmp_path / "timing.cache")
    assert plan.stat().st_size > 0 and (tmp_path / "timing.cache").is_file()
    assert json.loads(plan.with_suffix(".json").read_text()) == record
    batch = {"image_a": np.random.default_rng(0).standard_normal(
        (3, 1, MICRO.img_size, MICRO.img_size, MICRO.img_size), dtype=np.float32)}
    probs = tensorrt_build.tensorrt_runner(plan, "probs")(batch)
    reference = onnxruntime_runner(onnx_path)(batch)
    assert (probs.argmax(1) == reference.argmax(1)).mean() > 0.99
