"""`retnet serve`: an OpenAI-compatible server with continuous batching and prefix-state caching."""

from __future__ import annotations

from dataclasses import dataclass

# FastAPI and uvicorn (the [serve] extra) are imported only when a server is built, so that
# `retnet --help` works without them.
__all__ = ["ServeConfig", "build_app", "serve"]


@dataclass
class ServeConfig:
    """Run options of `retnet serve`."""

    checkpoint: str  # run directory or checkpoint folder
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 exposes the server to the network
    port: int = 8000
    model_name: str | None = None  # the name clients pass as "model" (default: folder name)
    dtype: str = "float32"  # float32, bfloat16 or float64
    device: str | None = None  # default: cuda if available, else cpu
    max_batch: int = 32  # sequences decoded together
    max_queue: int = 64  # requests waiting for a slot; beyond that: 429
    cache_mib: int = 1024  # prefix-state cache size
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024  # upper bound on a request's max_tokens
    max_request_kib: int = 1024
    drain_s: float = 10.0  # on shutdown, time given to in-flight streams


def build_app(cfg: ServeConfig):
    import torch

    from retnet.checkpoint import load_checkpoint
    from retnet.model.layout import use_inference_layout
    from retnet.serve.api import Api, Limits, create_app
    from retnet.serve.engine import Engine
    from retnet.tokenizer import load_chat_template

    ckpt = load_checkpoint(cfg.checkpoint)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if cfg.dtype not in dtype:
        raise ValueError(f"dtype must be float32, bfloat16 or float64; got {cfg.dtype!r}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = use_inference_layout(ckpt.build_model(device).to(dtype[cfg.dtype]))
    engine = Engine(model, ckpt.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    cache_bytes=cfg.cache_mib << 20)
    name = cfg.model_name or ckpt.path.parent.parent.name or "retnet"
    limits = Limits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens,
                    max_request_bytes=cfg.max_request_kib << 10)
    api = Api(engine, ckpt.tokenizer, name, limits, load_chat_template(ckpt.path))
    app = create_app(api, on_shutdown=lambda: engine.shutdown(cfg.drain_s))
    return app, engine, name


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app, _, name = build_app(cfg)
    print(f"serving {name!r} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=int(cfg.drain_s) + 5)
