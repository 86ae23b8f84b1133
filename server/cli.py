"""`llada-serve`: load a checkpoint and serve it (every flag also reads LLADA_<FLAG> from the env)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from sampler.params import MAX_DRAFT_DEPTH

log = logging.getLogger("llada.cli")

DRAIN_BACKSTOP_S = 2.0  # uvicorn waits this long past the grace before it cancels handlers


def _env(name: str, default=None):
    v = os.environ.get("LLADA_" + name.upper().replace("-", "_"))
    return default if v is None or v == "" else v


def _drafting_flags(a) -> None:
    """Exact parallel decoding's flags (`a`: the parser's add_argument)."""
    a("--draft-depth", type=int, default=_env("draft_depth", 0),
      help="exact parallel decoding for requests that leave draft_depth unset: guessed next steps "
           "verified per forward, 0 (off) to 8; the same ids, fewer forwards (default: %(default)s)")
    a("--draft-budget", type=int, default=_env("draft_budget", 2048),
      help="query tokens a step may reach with draft rows, and key/value rows lent to them; a batch "
           "already at it runs no drafts (default: %(default)s)")
    a("--adaptive-drafting", choices=["auto", "on", "off"], default=str(_env("adaptive_drafting", "auto")).lower(),
      help="plan draft rows only while the measured steps say they pay: the batch times its steps with "
           "and without drafts (seconds per sampler step advanced) and drafts only where it is faster; "
           "the ids are the same either way (default auto: on for a CPU, off on CUDA)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llada-serve",
        description="OpenAI-compatible server for LLaDA masked-diffusion language models. "
                    "Each flag can also be set from the environment as LLADA_<FLAG> "
                    "(for example LLADA_MODEL, LLADA_PORT, LLADA_API_KEY).")
    a = p.add_argument
    a("--model", default=_env("model"), help="checkpoint directory in the Hugging Face layout "
      "(default: the embedded default model)")
    a("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    a("--port", type=int, default=_env("port", 8000), help="port (default 8000)")
    a("--device", choices=["auto", "cuda", "cpu"], default=_env("device", "auto"),
      help="where to run (default auto: cuda when available)")
    a("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=_env("dtype", "auto"),
      help="weights dtype (default auto: bf16 on a GPU, fp32 on a CPU)")
    a("--cpu-threads", type=int, default=_env("cpu_threads", 0), help="intra-op threads on a CPU "
      "(default 0: for a small model, 1 or every core, timed at start-up and again while serving)")
    a("--served-model-name", default=_env("served_model_name"),
      help="model id clients use (default: the checkpoint directory's name)")
    a("--max-batch-size", type=int, default=_env("max_batch_size", 32),
      help="running requests per step (default: %(default)s)")
    a("--max-batch-tokens", type=int, default=_env("max_batch_tokens", 16384),
      help="canvas tokens (prompt + generated) held by the running batch (default: %(default)s)")
    _drafting_flags(a)
    a("--max-queue", type=int, default=_env("max_queue", 256),
      help="waiting requests before new ones are refused with 429 (default: %(default)s)")
    a("--request-timeout", type=float, default=_env("request_timeout", 600.0),
      help="seconds a request may take from arrival, 0: no limit (default: %(default)s)")
    a("--api-key", default=_env("api_key"), help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') "
      "on /v1/* (default: none, open)")
    a("--max-body-bytes", type=int, default=_env("max_body_bytes"),
      help="largest request body accepted; larger ones get 413 (default: 2 KiB per token of the model's "
      "context, at least 1 MiB)")
    a("--body-timeout", type=float, default=_env("body_timeout", 30.0),
      help="seconds a client may take to send a request body; slower ones get 408, 0: no limit "
      "(default: %(default)s)")
    a("--allowed-hosts", default=_env("allowed_hosts"),
      help="comma-separated Host header names answered ('*': any); others get 400. Default: the bind "
      "address, localhost, 127.0.0.1 and ::1 when bound to loopback, any name otherwise")
    a("--header-timeout", type=float, default=_env("header_timeout", 10.0),
      help="seconds a client may take to send a request's line and headers; then the connection is closed "
      "(default: %(default)s)")
    a("--max-connections", type=int, default=_env("max_connections", 1024),
      help="open connections answered; past them a new connection gets 503 too_many_connections and is "
      "closed (default: %(default)s; lowered to fit the open-files limit, raised to its hard limit at start)")
    a("--timeout-keep-alive", type=float, default=_env("timeout_keep_alive", 5.0),
      help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    a("--shutdown-grace", type=float, default=_env("shutdown_grace", 30.0),
      help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    a("--drain-delay", type=float, default=_env("drain_delay", 5.0),
      help="seconds after SIGTERM during which the server still accepts connections, answering /ready "
      "and new requests with 503 so a load balancer takes it out of rotation, before it closes its "
      "listener (default: %(default)s; Ctrl-C skips it)")
    a("--strict-fields", action="store_true", default=_env("strict_fields", "") in ("1", "true", "yes"),
      help="refuse request fields this server does not know with a 400 (default: ignore them with a "
      "warning in the log)")
    a("--chat-special-tokens", action="store_true",
      default=_env("chat_special_tokens", "") in ("1", "true", "yes"),
      help="parse special tokens written inside chat message content as control tokens (trusted "
      "deployments only; default: off, they are plain text, so a message cannot open or close turns)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction,
      default=str(_env("cuda_graphs", "1")).lower() not in ("0", "false", "no", "off"),
      help="replay captured CUDA graphs of the denoising step (CUDA only; default on; capture time "
           "and memory are logged at start)")
    a("--tensor-parallel-size", type=int, default=_env("tensor_parallel_size", 1),
      help="shard the model over N ranks, one process per GPU on this node (or the ranks a launcher "
           "such as torchrun started); rank 0 serves HTTP (default: %(default)s)")
    a("--plan", action="store_true", help="print the memory per rank (weights, KV buffers at "
      "--max-batch-tokens, graph pool estimate) for --tensor-parallel-size, whether it fits the GPU and the "
      "smallest size that does, without loading weights, and exit (default: off)")
    a("--plan-gpu", default=_env("plan_gpu"), help="the GPU --plan judges the fit on: "
      "H100, H200, A100, A100-40, L40S, H20 (default: the local GPU)")
    a("--log-level", default=_env("log_level", "info"), choices=["debug", "info", "warning", "error"],
      help="log level (default: %(default)s)")
    return p


def _fail(msg: str, code: int = 1):
    print(f"llada-serve: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _port_in_use(host: str, port: int) -> str | None:
    """Why host:port cannot be bound (None when it can), checked before the model is loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return str(e)
    fam, kind, proto, _, addr = infos[0]
    with socket.socket(fam, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def _start_ranks(args, model_dir: str, size: int, launched: bool, follower: bool):
    """Tensor parallel: refuse a size the model cannot take, start the follower ranks (unless a
    launcher did), join the process group. A follower rank serves rank 0 here and exits."""
    from pathlib import Path

    from sampler.runner import Ranks, follower_main
    from sampler.scheduler import EngineConfig
    from weights.family import read_config
    from weights.fields import ConfigError
    from weights.parallel import ParallelError, check_divisible

    try:
        check_divisible(read_config(Path(model_dir) / "config.json"), size)
    except (ParallelError, ConfigError, OSError) as e:
        _fail(f"{model_dir}: {e}", 2)
    if args.cuda_graphs:  # capturing the step with its collectives is not verified yet: eager
        log.info("tensor parallel: the step runs eagerly (CUDA graphs off)")
        args.cuda_graphs = False
    if follower:
        econf = EngineConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                             cuda_graphs=args.cuda_graphs)
        try:
            code = follower_main(model_dir, args.device, args.dtype, size, econf)
        except Exception as e:  # noqa: BLE001
            _fail(f"rank {os.environ.get('RANK')}: {e}")
        sys.exit(code)
    try:
        return Ranks.start(size, model_dir, args, spawn=not launched)
    except RuntimeError as e:
        _fail(str(e), 2)


def _print_plan(args, model_dir: str, size: int) -> None:
    """`--plan`: the memory plan from config.json (no weights read)."""
    from pathlib import Path

    from weights.family import read_config
    from weights.fields import ConfigError
    from weights.parallel import ParallelError, check_divisible
    from weights.plan import GPUS, format_plan, local_gpu

    try:
        config = read_config(Path(model_dir) / "config.json")
        check_divisible(config, size)
    except (ParallelError, ConfigError, OSError) as e:
        _fail(f"{model_dir}: {e}", 2)
    if args.plan_gpu:
        key = {k.lower(): k for k in GPUS}.get(args.plan_gpu.lower())
        if key is None:
            _fail(f"--plan-gpu {args.plan_gpu!r} is not known; choose one of {', '.join(GPUS)}", 2)
        gpu, gpu_bytes = key, GPUS[key]
    else:
        gpu, gpu_bytes = local_gpu() or (None, None)
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    for line in format_plan(Path(model_dir).name, config, size, dtype, args.max_batch_tokens,
                            args.max_batch_size, gpu, gpu_bytes):
        print(line)


def _check_args(args) -> None:
    """Refuse (exit 2) flag values no server can run with."""
    for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1", 2)
    if args.max_body_bytes is not None and int(args.max_body_bytes) < 1024:
        _fail("--max-body-bytes must be >= 1024", 2)
    if args.cpu_threads < 0:
        _fail("--cpu-threads must be >= 0 (0: measured at start-up)", 2)
    if args.max_connections < 1:
        _fail("--max-connections must be >= 1", 2)
    if args.drain_delay < 0:
        _fail("--drain-delay must be >= 0", 2)
    if not 0 <= args.draft_depth <= MAX_DRAFT_DEPTH or args.draft_budget < 0:
        _fail(f"--draft-depth must be in [0, {MAX_DRAFT_DEPTH}] and --draft-budget >= 0", 2)
    if args.adaptive_drafting not in ("auto", "on", "off"):  # LLADA_ADAPTIVE_DRAFTING is not checked by argparse
        _fail(f"--adaptive-drafting must be auto, on or off, got {args.adaptive_drafting!r}", 2)
    if args.header_timeout <= 0:
        _fail("--header-timeout must be > 0", 2)
    if not 1 <= args.port <= 65535:
        _fail(f"--port must be in 1..65535, got {args.port}", 2)
    if int(args.tensor_parallel_size) < 1:
        _fail(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}", 2)
    if args.allowed_hosts:
        from server.guards import parse_allowed_host

        for entry in args.allowed_hosts.split(","):
            try:
                entry.strip() in ("", "*") or parse_allowed_host(entry)
            except ValueError as e:
                _fail(str(e), 2)


def _draining_server(uvicorn, engine, args):
    """uvicorn.Server that drains on SIGTERM (see handle_exit)."""

    class Server(uvicorn.Server):
        close_at: float | None = None  # when the listener closes (the drain delay's end)

        def handle_exit(self, sig, frame):
            # SIGTERM: stop intake at once (new requests get 503 shutting_down with Connection: close,
            # /ready turns 503) while the listener stays open for --drain-delay, so a load balancer
            # sees /ready fail and clients see the 503; then close the listener. In-flight requests
            # get --shutdown-grace from the signal; what is left then is answered 503; exit 0.
            if self.close_at is None and not self.should_exit:
                delay = 0.0 if sig == signal.SIGINT else args.drain_delay
                log.info("signal %s: draining (new requests get 503; listener open for %gs more; "
                         "in-flight requests get %gs)", sig, delay, args.shutdown_grace)
                engine.drain(args.shutdown_grace)
                self.close_at = time.monotonic() + delay
                if delay <= 0:
                    self.should_exit = True
                return
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True  # a second signal ends the drain delay

        async def on_tick(self, counter):
            if self.close_at is not None and not self.should_exit and time.monotonic() >= self.close_at:
                log.info("drain delay over: closing the listener")
                self.should_exit = True
            return await super().on_tick(counter)

    return Server


def _log_settings(args, bundle, param_bytes, kv_bytes, mem, max_body, allowed_hosts, max_conn, limits):
    log.info("device %s, dtype %s, weights %.1f MiB, KV buffers %.1f MiB for %d canvas tokens%s",
             bundle.device, str(bundle.dtype).replace("torch.", ""), param_bytes / 2**20, kv_bytes / 2**20,
             args.max_batch_tokens, mem)
    log.info("engine: max_batch_size %d, max_batch_tokens %d, max_queue %d, request_timeout %s, "
             "shutdown_grace %gs, drain_delay %gs, API key %s", args.max_batch_size, args.max_batch_tokens,
             args.max_queue, f"{args.request_timeout:g}s" if args.request_timeout > 0 else "none",
             args.shutdown_grace, args.drain_delay,
             "required" if args.api_key else "off")
    log.info("guards: max body %d bytes, header timeout %gs, body timeout %s, allowed hosts %s", max_body,
             args.header_timeout, f"{args.body_timeout:g}s" if args.body_timeout > 0 else "none",
             ", ".join(allowed_hosts) if allowed_hosts else "any")
    log.info("connections: at most %d open (open-files limit %s)", max_conn,
             "unknown" if limits is None else f"{limits[0]}, hard {limits[1]}")


def _model_dir(args) -> str:
    """--model, or the embedded default model (exit 2 when neither is there)."""
    from weights import default_model_path

    model_dir = args.model
    if not model_dir:
        default = default_model_path()
        if not (default / "config.json").is_file():
            _fail(f"no --model given (or LLADA_MODEL) and the embedded default model is not available: "
                  f"{default} holds no config.json. Pass --model DIR with a LLaDA checkpoint in the "
                  "Hugging Face layout.", 2)
        model_dir = str(default)
    return model_dir


def _exit_now() -> None:
    """Every request is answered and the engine thread has ended: skip the interpreter's teardown of
    torch and friends (about a second on a busy CPU) so the process exits right after its grace."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _load(args, model_dir, tp=None):
    """The checkpoint (exit 1 when it cannot be loaded), its CPU threads, served name and weight bytes."""
    from weights.checkpoint import CheckpointError, load_checkpoint, pick_cpu_threads

    try:
        bundle = load_checkpoint(model_dir, device=args.device, dtype=args.dtype, tp=tp)
        # Timed at the batch the engine runs: its requests per step, as many 64-token canvases as
        # its token budget holds (a batched forward is what concurrent requests share).
        batch = min(args.max_batch_size, max(1, args.max_batch_tokens // 64))
        threads = pick_cpu_threads(bundle.config, bundle.device, model=bundle.model if tp is None else None,
                                   override=args.cpu_threads or None, batch=batch)
    except (CheckpointError, OSError, ValueError) as e:
        _fail(f"cannot load the model from {model_dir}: {e}")
    cfg = bundle.config
    name = args.served_model_name or bundle.name or "llada"
    param_bytes = sum(p.numel() * p.element_size() for p in bundle.model.parameters())
    log.info("model %s from %s: %s (decoding %s), %.2fM parameters (%.2fM active), %d layers, hidden %d, "
             "vocab %d, max_sequence_length %d, tokenizer %s", name, bundle.path, cfg.family, bundle.decoding,
             cfg.num_parameters / 1e6, cfg.active_parameters / 1e6, cfg.n_layers, cfg.hidden_size,
             cfg.vocab_size, cfg.max_sequence_length, "yes" if bundle.tokenizer is not None else "none")
    return bundle, threads, name, param_bytes


def _live_threads(args, bundle, ranks) -> tuple:
    """Where the start-up measured the thread count, the counts the engine keeps choosing between."""
    from weights.checkpoint import live_thread_counts

    if ranks is not None:
        return ()
    return live_thread_counts(bundle.config, bundle.device, override=args.cpu_threads or None)


def _prepare(args):
    """The port check, the model directory and, under tensor parallelism, the started ranks (a
    follower rank serves here and exits): (model_dir, ranks or None), or None once --plan printed."""
    tp_size = int(args.tensor_parallel_size)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun or another launcher
    follower = launched and int(os.environ.get("RANK", "0")) != 0
    busy = None if follower or args.plan else _port_in_use(args.host, args.port)
    if busy:
        _fail(f"cannot listen on {args.host}:{args.port}: {busy} (is another server running there? "
              "choose another --port)")
    model_dir = _model_dir(args)
    if args.plan:
        _print_plan(args, model_dir, tp_size)
        return None
    ranks = None
    if tp_size > 1 or launched:
        ranks = _start_ranks(args, model_dir, tp_size, launched, follower)
    return model_dir, ranks


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_args(args)
    prepared = _prepare(args)
    if prepared is None:  # --plan printed
        return
    model_dir, ranks = prepared

    import torch
    import uvicorn

    from sampler.scheduler import EngineConfig
    from server.app import create_app
    from server.connection import FD_RESERVE, protocol_with_header_timeout, raise_fd_limit
    from server import logsafe
    from server.guards import default_allowed_hosts, default_max_body_bytes
    bundle, threads, name, param_bytes = _load(args, model_dir, None if ranks is None else ranks.tp)
    cfg = bundle.config
    econf = EngineConfig(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                         max_queue=args.max_queue,
                         request_timeout=args.request_timeout if args.request_timeout > 0 else None,
                         cuda_graphs=args.cuda_graphs, draft_depth=args.draft_depth,
                         draft_budget=args.draft_budget,
                         adaptive_drafting={"on": True, "off": False}.get(args.adaptive_drafting))
    if args.allowed_hosts:
        allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    else:
        allowed_hosts = default_allowed_hosts(args.host)
    max_body = int(args.max_body_bytes) if args.max_body_bytes else default_max_body_bytes(cfg.max_sequence_length)
    max_conn = args.max_connections
    limits = raise_fd_limit()
    if limits is not None and limits[0] - FD_RESERVE < max_conn:
        max_conn = max(1, limits[0] - FD_RESERVE)
        log.warning("--max-connections %d does not fit the open-files limit (%d, hard %d): using %d",
                    args.max_connections, limits[0], limits[1], max_conn)
    econf.cpu_threads_live = _live_threads(args, bundle, ranks)  # where start-up measured: again while serving
    try:
        app = create_app(bundle, econf, served_model_name=name, api_key=args.api_key or None,
                         shutdown_grace=args.shutdown_grace, max_body_bytes=max_body,
                         body_timeout=args.body_timeout, allowed_hosts=allowed_hosts,
                         strict_fields=args.strict_fields, chat_special_tokens=args.chat_special_tokens,
                         freeze_gc=True)
    except (RuntimeError, ValueError) as e:  # e.g. the KV buffers do not fit the device
        _fail(f"cannot set up the engine: {e}")
    engine = app.state.engine
    if ranks is not None:
        ranks.attach(engine, app.state.metrics)
    kv_bytes = engine.batch.kv.nbytes
    mem = ""
    if bundle.device.type == "cuda":
        mem = f", GPU memory allocated {torch.cuda.memory_allocated(bundle.device) / 2**20:.0f} MiB"
    else:
        mem = f", {threads} CPU thread{'s' if threads > 1 else ''}"
    _log_settings(args, bundle, param_bytes, kv_bytes, mem, max_body, allowed_hosts, max_conn, limits)

    # uvicorn's own graceful-shutdown timeout is only a backstop: the engine fails what is left at the
    # end of the grace (503 shutting_down), so handlers answer and connections close right after it.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(0.0, args.shutdown_grace - args.drain_delay)
                            + DRAIN_BACKSTOP_S, access_log=False,
                            timeout_keep_alive=args.timeout_keep_alive,
                            http=protocol_with_header_timeout(args.header_timeout, max_conn))
    logsafe.install()  # uvicorn.Config set up its loggers: every handler escapes, clips, rate-limits

    server = _draining_server(uvicorn, engine, args)(config)
    log.info("listening on http://%s:%d (playground at /, OpenAI API at /v1, metrics at /metrics)",
             args.host, args.port)
    try:
        server.run()
    except OSError as e:
        _fail(f"cannot listen on {args.host}:{args.port}: {e}")
    if ranks is not None:
        ranks.stop()
    if not server.started:
        sys.exit(1)
    log.info("stopped")
    _exit_now()


if __name__ == "__main__":
    main()
