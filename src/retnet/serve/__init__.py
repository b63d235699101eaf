"""`retnet serve`: an OpenAI-compatible server with continuous batching and prefix-state caching."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from retnet.options import check_types, short
from retnet.serve.guard import is_loopback

# FastAPI and uvicorn (the [serve] extra) are imported only when a server is built, so that
# `retnet --help` works without them.
__all__ = ["ServeConfig", "build_app", "serve"]

DTYPES = ("float32", "bfloat16", "float64")


@dataclass
class ServeConfig:
    """Run options of `retnet serve`."""

    checkpoint: str  # run directory or checkpoint folder
    host: str = "127.0.0.1"  # bind address; a non-loopback one needs an API key
    port: int = 8000  # 1 to 65535
    api_key: str | None = field(default=None, repr=False)  # 'Bearer KEY'; or $RETNET_API_KEY
    allowed_host: list[str] = field(default_factory=list)  # Host names also accepted; '*': any
    allow_insecure_no_auth: bool = False  # bind a non-loopback --host without an API key
    model_name: str | None = None  # the name clients pass as "model" (default: folder name)
    dtype: str = "float32"  # float32, bfloat16 or float64
    device: str | None = None  # default: cuda if available, else cpu
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 64  # requests waiting for a slot; beyond that: 429
    cache_mib: int = 1024  # prefix-state cache size
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024  # upper bound on a request's max_tokens
    max_request_kib: int = 1024
    drain_s: float = 10.0  # on SIGTERM, time given to in-flight requests before they end

    def __post_init__(self) -> None:
        """Every option checked before the model loads: one line naming the bad one."""
        check_types(ServeConfig, {f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self)})
        checks = {"port": 1 <= self.port <= 65535, "max_batch": self.max_batch >= 1,
                  "max_queue": self.max_queue >= 1, "cache_mib": self.cache_mib >= 0,
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
        if self.api_key == "":
            self.api_key = None
        if not (is_loopback(self.host) or self.api_key or self.allow_insecure_no_auth):
            raise ValueError(f"--host {short(self.host)} exposes the server to the network "
                             "without authentication: pass --api-key KEY (or set "
                             "RETNET_API_KEY), or --allow-insecure-no-auth to do it anyway")


def build_app(cfg: ServeConfig):
    import torch

    from retnet.checkpoint import load_checkpoint
    from retnet.model.layout import use_inference_layout
    from retnet.serve.api import Api, Limits, create_app
    from retnet.serve.engine import Engine
    from retnet.serve.guard import allowed_hosts
    from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE

    ckpt = load_checkpoint(cfg.checkpoint)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = use_inference_layout(ckpt.build_model(device).to(dtype[cfg.dtype]))
    engine = Engine(model, ckpt.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    cache_bytes=cfg.cache_mib << 20)
    name = cfg.model_name or ckpt.path.parent.parent.name or "retnet"
    limits = Limits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens,
                    max_request_bytes=cfg.max_request_kib << 10)
    api = Api(engine, ckpt.tokenizer, name, limits,
              ckpt.chat_template or dict(DEFAULT_CHAT_TEMPLATE))  # verified by load_checkpoint
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


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from retnet.serve.drain import DrainingServer

    sock = _listen(cfg.host, cfg.port)
    try:
        app, engine, name = build_app(cfg)
    except BaseException:
        sock.close()
        raise
    print(f"serving {name!r} on http://{cfg.host}:{cfg.port}/v1"
          f"{'' if cfg.api_key else ' (no API key)'}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    DrainingServer(config, engine, cfg.drain_s).run(sockets=[sock])
