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
    model: Path = typer.Option(None, "--model", "-m", metavar="GGUF",
                               help="GGUF file to serve (default: the default model's GGUF)."),
    slots: int = typer.Option(8, "--slots", "-np", metavar="N", help="Parallel slots (concurrent requests)."),
    ctx_size: int = typer.Option(8192, "--ctx", "-c", metavar="N", help="Context size shared by the slots."),
    threads: int = typer.Option(None, "--threads", "-t", metavar="N",
                                help="CPU threads (default: cores minus one, at least 1)."),
    port: int = typer.Option(8080, "--port", metavar="PORT", help="Port on 127.0.0.1 (0: a free one)."),
    quiet: bool = options.QUIET,
) -> None:
    """Start the cached llama-server on 127.0.0.1 (building it first where needed); stop with Ctrl-C."""
    import time

    from ..endpoint.llama_server import LlamaServer, build_llama_server, default_gguf

    log = console.logger(quiet)
    binary = build_llama_server(log=log).binary
    gguf = model or default_gguf(log=log)
    srv = LlamaServer(binary, gguf, slots=slots, ctx=ctx_size, threads=threads, port=port or None)
    with srv:
        console.out.print(f"llama-server ready: {srv.url} ({slots} slots, {srv.threads} threads); Ctrl-C stops it")
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(0.5)
        code = srv.proc.returncode if srv.proc is not None else None
    if code:
        from ..endpoint.llama_server import ServerBuildError

        raise ServerBuildError(f"llama-server exited with code {code}")


def register(app: typer.Typer) -> None:
    server_app = typer.Typer(help="Build and run llama.cpp's llama-server (an engine to audit with --endpoint).",
                             no_args_is_help=True)
    app.add_typer(server_app, name="server")
    server_app.command("build")(build_cmd)
    server_app.command("start")(start_cmd)
