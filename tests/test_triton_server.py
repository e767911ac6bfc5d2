"""Triton serving against a real `tritonserver` on loopback (python backend, ONNX Runtime).

Client-side tiling (engine + TritonPatchRuntime) and server-side tiling (the BLS volume
model) must reproduce the local engine's labels exactly; concurrent clients must all get
correct answers; a dead server, a killed server and a malformed request must each end in
one clear error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cmc_serve.engine import Segmenter
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes.onnxruntime_rt import OnnxRuntimeRuntime
from cmc_serve.runtimes.openvino_rt import OpenVinoRuntime
from cmc_serve.runtimes.precision import choose_precision
from cmc_serve.triton.client import (
    Endpoint,
    TritonConnection,
    TritonPatchRuntime,
    TritonVolumeClient,
)
from cmc_serve.triton.errors import (
    TritonInferenceError,
    TritonModelMismatch,
    TritonTimeout,
    TritonUnavailable,
)
from cmc_serve.triton.server import (
    TritonInstall,
    TritonServer,
    TritonServerError,
    TritonSetupError,
    check_loopback,
    docker_command,
    free_port,
    free_ports,
)

ROOT = Path(__file__).resolve().parents[1]
OPENVINO_PATCH = "cmc_patch_openvino"  # triton_fixture.OPENVINO_PATCH
OPENVINO_AUTO_PATCH = "cmc_patch_openvino_auto"  # triton_fixture.OPENVINO_AUTO_PATCH


def fp16_exact(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values that FP16 represents exactly, so an FP16 wire loses nothing."""
    return rng.normal(0.0, 1.0, size=shape).astype(np.float16).astype(np.float32)


# --- without a server ------------------------------------------------------------------

def test_only_loopback_addresses_are_accepted() -> None:
    assert check_loopback("127.0.0.1") == "127.0.0.1"
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):
        with pytest.raises(TritonServerError, match="not a loopback"):
            check_loopback(host)


def test_missing_install_names_the_setup_command(tmp_path: Path) -> None:
    with pytest.raises(TritonSetupError, match=r"\.ready: missing.*cmc_serve\.triton\.setup"):
        TritonInstall.locate(tmp_path / "nowhere")


def test_docker_command_mounts_repository_and_publishes_on_loopback(tmp_path: Path) -> None:
    argv = docker_command(tmp_path / "repository", http_port=9000, grpc_port=9001)
    assert argv[:3] == ["docker", "run", "--rm"]
    assert "127.0.0.1:9000:8000" in argv and "127.0.0.1:9001:8001" in argv
    assert f"{tmp_path}:/model:ro" in argv  # the model dir: graphs may live beside the repository
    assert "tritonserver --model-repository=/model/repository" in argv[-1]


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="grpc://127.0.0.1:8001"):
        Endpoint.parse("127.0.0.1:8001")


@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_server_down_is_one_clear_error(scheme: str, tiny_model_dir: Path) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TritonUnavailable, match=rf"Triton at {url} \(model cmc_patch\)"):
        TritonPatchRuntime(url, ModelInfo.load(tiny_model_dir))
    assert time.monotonic() - started < 10


# --- against the module's server -------------------------------------------------------

@pytest.mark.triton
def test_client_and_server_side_tiling_match_local_engine(
        triton_server: TritonServer, tiny_model_dir: Path) -> None:
    rng = np.random.default_rng(1)
    shape = (24, 36, 12)  # 3 x 4 x 1 tiles; W is shorter than the patch (virtual padding)
    image_a, image_b = fp16_exact(rng, shape), fp16_exact(rng, shape)
    with Segmenter(tiny_model_dir, runtime="onnxruntime", return_probs=True) as local:
        expected = local.segment(image_a, image_b)
    assert expected.probs is not None
    assert len(np.unique(expected.labels)) == 3  # a non-trivial segmentation

    with Segmenter(tiny_model_dir, runtime="triton",
                   server=f"grpc://{triton_server.grpc_url}") as remote:
        client_side = remote.segment(image_a, image_b)
    np.testing.assert_array_equal(client_side.labels, expected.labels)

    volume = TritonVolumeClient(f"http://{triton_server.http_url}", "cmc")
    try:
        server_side = volume.segment(image_a, image_b, probs=True)
    finally:
        volume.close()
    assert server_side.labels.dtype == np.uint8
    np.testing.assert_array_equal(server_side.labels, expected.labels)
    assert server_side.probs is not None
    np.testing.assert_array_equal(server_side.probs, expected.probs)


@pytest.mark.triton
def test_concurrent_clients_all_answered_correctly(
        triton_server: TritonServer, tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    graph = info.graph("fused", "onnxruntime", "fp32")
    local = OnnxRuntimeRuntime(graph.path, inputs=graph.inputs, output=graph.output,
                               precision="fp32", max_batch=info.max_batch)
    clients, requests, tiles = 4, 25, 3
    url = f"grpc://{triton_server.grpc_url}"
    stats = TritonConnection(url, 10.0, 1)

    def served_tiles() -> int:
        raw = stats.client.get_inference_statistics("cmc_patch", as_json=True)
        return int(raw["model_stats"][0].get("inference_count", 0))

    before = served_tiles()
    failures: list[str] = []
    answered = [0] * clients

    def client(index: int) -> None:
        runtime = TritonPatchRuntime(url, info, max_in_flight=2, request_batch=2)
        try:
            for i in range(requests):
                rng = np.random.default_rng(1000 * index + i)
                shape = (tiles, 1, 16, 16, 16)
                inputs = {"image_a": fp16_exact(rng, shape), "image_b": fp16_exact(rng, shape)}
                probs = runtime.run(inputs)
                want = local.run(inputs)
                if not np.allclose(probs, want, atol=1e-6) or \
                        not np.array_equal(probs.argmax(1), want.argmax(1)):
                    failures.append(f"client {index} request {i}: wrong probabilities")
                answered[index] += 1
        except Exception as exc:  # reported by the main thread
            failures.append(f"client {index}: {exc}")
        finally:
            runtime.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert answered == [requests] * clients
    # Triton records a request's statistics after its response has gone out, so
    # the last few may land a moment after the clients returned.
    want = before + clients * requests * tiles
    deadline = time.monotonic() + 10.0
    while served_tiles() < want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served_tiles() == want  # none lost or duplicated
    stats.close()


@pytest.mark.triton
def test_openvino_patch_model_matches_onnxruntime(triton_server: TritonServer,
                                                  tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    url = f"http://{triton_server.http_url}"
    rng = np.random.default_rng(3)
    tiles = {k: fp16_exact(rng, (4, 1, 16, 16, 16)) for k in ("image_a", "image_b")}
    onnxruntime = TritonPatchRuntime(url, info)
    openvino = TritonPatchRuntime(url, info, model_name=OPENVINO_PATCH)
    assert set(openvino.wire_dtypes.values()) == {np.dtype(np.float16)}
    want, got = onnxruntime.run(tiles), openvino.run(tiles)
    onnxruntime.close()
    openvino.close()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.999


@pytest.mark.triton
def test_openvino_patch_model_at_auto_precision_runs_what_this_cpu_runs_natively(
        triton_server: TritonServer, tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    graph = info.graph("fused", "onnxruntime", "fp32")
    rng = np.random.default_rng(4)
    tiles = {k: fp16_exact(rng, (4, 1, 16, 16, 16)) for k in ("image_a", "image_b")}
    served = TritonPatchRuntime(f"http://{triton_server.http_url}", info,
                                model_name=OPENVINO_AUTO_PATCH)
    got = served.run(tiles)
    served.close()
    chosen = choose_precision("openvino", "cpu", {"fp32", "bf16"}).precision
    local = {p: OpenVinoRuntime(graph.path, inputs=graph.inputs, output=graph.output,
                                precision=p, max_batch=4).run(tiles)
             for p in {"fp32", chosen}}
    np.testing.assert_allclose(got, local[chosen], atol=1e-5)
    if chosen == "bf16":  # and not fp32: the server really ran bf16
        assert np.abs(got - local["fp32"]).max() > 1e-4


@pytest.mark.triton
def test_bad_requests_get_tritons_error_passed_through(
        triton_server: TritonServer, tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    url = f"grpc://{triton_server.grpc_url}"
    runtime = TritonPatchRuntime(url, info)
    wrong_shape = np.zeros((2, 1, 8, 8, 8), np.float32)
    with pytest.raises(TritonInferenceError, match=r"server error: .*unexpected shape.*image_"):
        runtime.run({"image_a": wrong_shape, "image_b": wrong_shape})
    runtime.close()

    conn = TritonConnection(url, 10.0, 1)
    tile = np.zeros((1, 1, 16, 16, 16), np.float32)  # FP32 where the model declares FP16
    with pytest.raises(TritonInferenceError, match=r"data-type is 'FP32'.*expects 'FP16'"):
        conn.infer_many(OPENVINO_PATCH, [{"image_a": tile, "image_b": tile}], ["probs"], 1, 0)
    conn.close()

    volume = TritonVolumeClient(f"http://{triton_server.http_url}", "cmc")
    with pytest.raises(TritonInferenceError, match=r"mode 'a' .* not served"):
        volume.segment(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(TritonInferenceError, match=r"cmc: image_b contains NaN"):
        volume.segment(np.zeros((8, 8, 8), np.float32), np.full((8, 8, 8), np.nan, np.float32))
    volume.close()


@pytest.mark.triton
def test_client_timeout_is_one_clear_error(triton_server: TritonServer,
                                           tiny_model_dir: Path) -> None:
    runtime = TritonPatchRuntime(f"grpc://{triton_server.grpc_url}",
                                 ModelInfo.load(tiny_model_dir), timeout_s=0.001)
    tiles = np.zeros((runtime.max_batch, 1, 16, 16, 16), np.float32)
    with pytest.raises(TritonTimeout, match=r"\(model cmc_patch\): no answer within 0.001 s"):
        runtime.run({"image_a": tiles, "image_b": tiles})
    runtime.close()


@pytest.mark.triton
def test_model_not_matching_cmc_json_is_refused(
        triton_server: TritonServer, tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    other = dataclasses.replace(info, classes=(*info.classes, "kidney"))
    with pytest.raises(TritonModelMismatch, match=r"cmc.json vs Triton model cmc_patch.*4 classes"):
        TritonPatchRuntime(f"grpc://{triton_server.grpc_url}", other)


# --- servers of their own --------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_killed_server_mid_batch_fails_clearly(scheme: str, triton_install: TritonInstall,
                                               tiny_model_dir: Path) -> None:
    info = ModelInfo.load(tiny_model_dir)
    rng = np.random.default_rng(7)
    log: list[str] = []
    with TritonServer(tiny_model_dir / "repository", install=triton_install,
                      models=["cmc_patch"], log=log.append) as server:
        address = server.grpc_url if scheme == "grpc" else server.http_url
        runtime = TritonPatchRuntime(f"{scheme}://{address}", info, max_in_flight=4,
                                     request_batch=1, retries=1)
        batch = {k: fp16_exact(rng, (runtime.max_batch, 1, 16, 16, 16))
                 for k in ("image_a", "image_b")}
        runtime.run(batch)  # healthy first
        started = time.monotonic()
        killer = threading.Timer(0.02, os.kill, args=(server.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(TritonUnavailable, match=rf"{scheme}://127\.0\.0\.1:\d+ \(model "
                                                    r"cmc_patch\): server unreachable or gone"):
            for _ in range(500):  # runs until the server is gone
                runtime.run(batch)
        killer.join()
        assert time.monotonic() - started < 30
        runtime.close()


@pytest.mark.triton
def test_model_failing_to_load_reports_its_error(triton_install: TritonInstall,
                                                 tiny_model_dir: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_model_dir / "repository" / "cmc_patch", repository / "cmc_patch")
    (repository / "cmc_patch" / "1" / "fused_fp32.onnx").unlink()
    server = TritonServer(repository, install=triton_install, log=[].append)
    with pytest.raises(TritonServerError, match=r"exited with code 1 while loading .*: .*"
                                                r"cmc_patch: graph file .*fused_fp32.onnx does "
                                                r"not exist$"):
        server.start()
    assert not server.running()


@pytest.mark.triton
def test_cmc_serve_starts_prints_endpoints_and_stops_on_sigterm(
        triton_install: TritonInstall, tiny_model_dir: Path, tmp_path: Path) -> None:
    http_port, grpc_port = free_ports(2)
    env = {**os.environ, "CMC_TRITON_PREFIX": str(triton_install.prefix)}
    log = tmp_path / "serve.log"  # a file: the forwarded server log must never block on a pipe
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmc_cli.main", "serve", str(tiny_model_dir),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"ready: models cmc, cmc_patch, {OPENVINO_PATCH}"), lines
        assert f"grpc://127.0.0.1:{grpc_port}" in lines[1]
        assert f"http://127.0.0.1:{http_port}" in lines[2]
        url = f"http://127.0.0.1:{http_port}/v2/models/cmc/ready"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 0, err[-2000:]
    assert "docker run" in out
    assert err.rstrip().endswith("stopped")
    assert "Started GRPCInferenceService" in err  # the server log is forwarded
