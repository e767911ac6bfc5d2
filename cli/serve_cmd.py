"""`cmc serve MODEL_DIR`: serve an exported model's Triton repository on loopback.

Starts the local `tritonserver` (prepared by `python -m cmc_serve.triton.setup`) on
MODEL_DIR/repository, waits until every model is ready, prints the endpoints and the
equivalent official-container command, forwards the server log and stops the server
cleanly on Ctrl-C / SIGTERM. Heavy imports live inside `command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import EXIT_FAILED, fail, went_ahead


def command(
    model_dir: Annotated[Path, typer.Argument(help="Exported model dir (cmc.json, repository/).")],
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    host: Annotated[str, typer.Option(help="Loopback address to listen on (the local server "
                                           "never listens on a network).")] = "127.0.0.1",
    triton_prefix: Annotated[Path | None, typer.Option(
        help="Prepared server folder (default: $CMC_TRITON_PREFIX or ./.triton).")] = None,
    ready_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the models to load.")] = 180.0,
) -> None:
    """Serve MODEL_DIR/repository with a local Triton server until interrupted."""
    from cmc_common.interrupts import sigterm_as_interrupt
    from cmc_serve.model_dir import ModelDirError, ModelInfo, verify_files
    from cmc_serve.triton.server import (
        TritonInstall,
        TritonServer,
        docker_command,
        format_command,
        ignore_stop_signals,
    )

    info = ModelInfo.load(model_dir)
    verify_files(info.repository_files)  # a damaged copy is named here, not in a server log
    repository = model_dir / "repository"
    if not any(repository.glob("*/config.pbtxt")):
        raise ModelDirError(f"{repository}: no Triton models (config.pbtxt) there; "
                            "re-export the model with this cmc")
    server = TritonServer(repository, install=TritonInstall.locate(triton_prefix), host=host,
                          http_port=http_port, grpc_port=grpc_port,
                          ready_timeout_s=ready_timeout)
    code = 0
    with sigterm_as_interrupt(), went_ahead():
        try:
            typer.echo(f"starting tritonserver for {info.name} ({repository})", err=True)
            server.start()
            typer.echo(f"ready: models {', '.join(server.models)}\n"
                       f"  gRPC  grpc://{server.grpc_url}\n"
                       f"  HTTP  http://{server.http_url}\n"
                       f"  segment: cmc segment IMAGE --model {model_dir} --runtime triton "
                       f"--server grpc://{server.grpc_url} --out OUT\n"
                       "the same repository in the official container (GPU host):\n  "
                       + format_command(docker_command(repository, http_port=http_port,
                                                       grpc_port=grpc_port)))
            code = server.wait() or 0
        except KeyboardInterrupt:
            ignore_stop_signals()
        finally:
            server.stop()
    if code != 0:
        raise fail("serve", f"tritonserver exited by itself with code {code}; see its log "
                            "above", EXIT_FAILED)
    typer.echo("stopped", err=True)
