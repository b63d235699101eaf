"""`retnet serve`: an OpenAI-compatible server with continuous batching and prefix-state caching."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass

from retnet.device import check_device
from retnet.loading import DTYPES, check_quantization
from retnet.modules.quant import QUANTIZATIONS
from retnet.options import check_types, opt, short
from retnet.serve.guard import is_loopback
from retnet.tokenizer import read_chat_template

# FastAPI and uvicorn (the [serve] extra) are imported only when a server is built, so that
# `retnet --help` works without them.
__all__ = ["ServeConfig", "build_app", "command", "serve"]


@dataclass
class ServeConfig:
    """Run options of `retnet serve` (vLLM's names for two of them as aliases)."""

    checkpoint: str = opt(help="run directory or checkpoint folder")
    host: str = opt("127.0.0.1", "bind address; a non-loopback one needs an API key")
    port: int = opt(8000, "1 to 65535")
    api_key: str | None = opt(None, "clients must send 'Authorization: Bearer KEY' (default: "
                              "$RETNET_API_KEY)", metavar="KEY", secret=True)
    allowed_host: list[str] = opt(help="Host names also accepted; '*': any", factory=list,
                                  metavar="NAME")
    allow_insecure_no_auth: bool = opt(False, "bind a non-loopback --host without an API key")
    model_name: str | None = opt(None, 'the name clients pass as "model" (default: the run '
                                 "folder's name)", aliases=("--served-model-name",))
    dtype: str = opt("float32", "the weights' dtype", choices=tuple(DTYPES))
    quantization: str | None = opt(None, "int8: weight-only int8 (as `retnet generate`)",
                                   choices=QUANTIZATIONS)
    adapter: str | None = opt(None, "a LoRA adapter.safetensors merged into the weights (as "
                              "`retnet generate`)", metavar="FILE")
    device: str | None = opt(None, "cpu, cuda, cuda:N or mps (default: cuda if available, "
                             "else cpu)")
    max_batch: int = opt(32, "sequences decoded together", aliases=("--max-num-seqs",))
    max_queue: int = opt(64, "requests waiting for a slot; beyond that: 429")
    cache_mib: int = opt(1024, "prefix-state cache size (MiB)")
    state_store_mib: int = opt(1024, "bytes kept for saved conversation states (save_state), "
                               "in MiB; beyond it the least recently used goes (0: save_state "
                               "off)")
    prefill_tokens: int = opt(256, "prompt tokens read between two decode steps, shared by "
                              "every prompt waiting to start")
    max_rows_per_request: int | None = opt(None, "sequences one HTTP request may decode at "
                                           "once; its other prompts wait (default: half of "
                                           "--max-batch)")
    max_connections: int = opt(512, "open connections; more are closed at once (at most the "
                               "open-file limit minus 64)")
    read_timeout_s: float = opt(10.0, "seconds a client has to send a request's headers, and "
                                "then its body; then the connection is closed (408 for a body)")
    max_prompt_tokens: int = opt(8192, "longest prompt accepted, in tokens (RetNet has no "
                                 "context window: this bounds work, not memory)",
                                 aliases=("--max-model-len",))
    chat_template: str | None = opt(None, "a JSON chat template {\"message\": "
                                    "\"...{role}...{content}...\", \"generation_prompt\": "
                                    "\"...\"} (default: the run's)", metavar="FILE")
    max_tokens: int = opt(1024, "upper bound on a request's max_tokens")
    max_request_kib: int = opt(1024, "largest request body accepted (KiB)")
    drain_s: float = opt(10.0, "on SIGTERM, seconds given to in-flight requests before they "
                         "end")

    @classmethod
    def from_cli(cls, values: dict) -> ServeConfig:
        """The options given on the command line; the API key from $RETNET_API_KEY when
        --api-key is not given (as vLLM's VLLM_API_KEY: an environment variable keeps the key
        out of `ps`)."""
        values = {"api_key": os.environ.get("RETNET_API_KEY") or None, **values}
        return cls(**values)

    def __post_init__(self) -> None:
        """Every option checked before the model loads: one line naming the bad one."""
        check_quantization(self.quantization, self.dtype)
        check_types(ServeConfig, {f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self)})
        checks = {"port": 1 <= self.port <= 65535, "max_batch": self.max_batch >= 1,
                  "max_queue": self.max_queue >= 1, "cache_mib": self.cache_mib >= 0,
                  "state_store_mib": self.state_store_mib >= 0,
                  "prefill_tokens": self.prefill_tokens >= 1,
                  "max_rows_per_request": (self.max_rows_per_request is None
                                           or self.max_rows_per_request >= 1),
                  "max_connections": self.max_connections >= 1,
                  "read_timeout_s": (math.isfinite(self.read_timeout_s)
                                     and self.read_timeout_s > 0),
                  "max_prompt_tokens": self.max_prompt_tokens >= 1,
                  "max_tokens": self.max_tokens >= 1, "max_request_kib": self.max_request_kib >= 1,
                  "drain_s": math.isfinite(self.drain_s) and self.drain_s >= 0,
                  "dtype": self.dtype in DTYPES, "host": bool(self.host.strip()),
                  "api_key": self.api_key is None or (self.api_key.isascii() and
                                                      self.api_key.isprintable()
                                                      and " " not in self.api_key)}
        for name, ok in checks.items():
            if not ok and name == "api_key":  # HTTP headers carry ASCII: others never match
                raise ValueError("invalid --api-key (hidden): use printable ASCII characters "
                                 "without spaces")
            if not ok:
                raise ValueError(f"invalid --{name.replace('_', '-')} "
                                 f"{short(getattr(self, name))}; see `retnet serve --help`")
        check_device(self.device)
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a bad file fails before the model loads
        if self.api_key == "":
            self.api_key = None
        if not (is_loopback(self.host) or self.api_key or self.allow_insecure_no_auth):
            raise ValueError(f"--host {short(self.host)} exposes the server to the network "
                             "without authentication: pass --api-key KEY (or set "
                             "RETNET_API_KEY), or --allow-insecure-no-auth to do it anyway")


def build_app(cfg: ServeConfig):
    from retnet.device import pick_device
    from retnet.loading import load_run
    from retnet.model.fast_decode import decode_path
    from retnet.serve.api import Api, Limits, create_app
    from retnet.serve.engine import Engine
    from retnet.serve.guard import allowed_hosts
    from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE

    run = load_run(cfg.checkpoint, pick_device(cfg.device), cfg.dtype, cfg.quantization,
                   layout="inference", adapter=cfg.adapter)
    model, tok = run.model, run.tokenizer
    print(f"retnet serve: decode: {decode_path(model)}", file=sys.stderr)
    engine = Engine(model, tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    cache_bytes=cfg.cache_mib << 20, state_bytes=cfg.state_store_mib << 20,
                    prefill_tokens=cfg.prefill_tokens, request_rows=cfg.max_rows_per_request)
    name = cfg.model_name or run.name or "retnet"
    limits = Limits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens,
                    max_request_bytes=cfg.max_request_kib << 10)
    template = (read_chat_template(cfg.chat_template) if cfg.chat_template else
                run.chat_template or dict(DEFAULT_CHAT_TEMPLATE))  # verified when loaded
    api = Api(engine, tok, name, limits, template, read_timeout_s=cfg.read_timeout_s)
    app = create_app(api, on_shutdown=lambda: engine.shutdown(cfg.drain_s),
                     api_key=cfg.api_key, allowed_hosts=allowed_hosts(cfg.host, cfg.allowed_host))
    return app, engine, name


def _listen(host: str, port: int):
    """Bind before the model loads, so that a taken port or a bad host fails at once."""
    import socket

    try:
        return socket.create_server((host.strip("[]"), port),
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another "
                         "--port or --host") from None


def command(cfg: ServeConfig) -> int:
    """`retnet serve`: serve until SIGTERM or Ctrl-C (then drain)."""
    serve(cfg)
    return 0


def serve(cfg: ServeConfig) -> None:
    from retnet.serve.drain import DrainingServer

    sock = _listen(cfg.host, cfg.port)
    try:
        app, engine, name = build_app(cfg)
    except BaseException:
        sock.close()
        raise
    print(f"serving {name!r} on http://{cfg.host}:{cfg.port}/v1"
          f"{'' if cfg.api_key else ' (no API key)'}", flush=True)
    DrainingServer(uvicorn_config(app, cfg), engine, cfg.drain_s).run(sockets=[sock])


def uvicorn_config(app, cfg: ServeConfig, log_level: str = "warning"):
    """uvicorn's settings for `app`: the connection cap and header deadline of
    `connections.LimitedH11`, h11's 16 KiB bound on a request's headers (its default), a 5 s
    keep-alive, and logs that repeat a message at most once per 10 s."""
    import uvicorn

    from retnet.serve.connections import connection_cap, limited_h11, quiet_logs

    cap = connection_cap(cfg.max_connections)
    if cap < cfg.max_connections:
        print(f"retnet serve: --max-connections {cfg.max_connections} lowered to {cap} (the "
              "open-file limit, `ulimit -n`, less 64)", file=sys.stderr)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                            http=limited_h11(cap, cfg.read_timeout_s), timeout_keep_alive=5)
    quiet_logs()  # after uvicorn.Config, which configures its loggers
    return config
