"""``rcc serve``'s arguments and command function (imports no web framework
until it runs, so the CLI works without the ``serve`` extra)."""

from __future__ import annotations

import argparse

from ..errors import RCCError
from .config import ENGINES, ServeConfig, default_store, read_api_key


def serve_args(p: argparse.ArgumentParser) -> None:
    from ..bundled import DEFAULT_MODEL

    d = ServeConfig(store="-")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the bundled {DEFAULT_MODEL} (default) or a checkpoint")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    p.add_argument("--store", help=f"folder of compressed contexts and their index (default {default_store()})")
    p.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY' with the key in this file")
    p.add_argument("--max-context-tokens", type=int, default=d.max_context_tokens,
                   help=f"longest document accepted; 413 beyond (default {d.max_context_tokens})")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help=f"questions waiting or running at once; 429 beyond (default {d.max_concurrent})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"questions on one context answered together (default {d.max_batch})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"largest max_tokens a request may ask for (default {d.max_new_tokens})")
    p.add_argument("--cache-mib", type=int, default=d.cache_mib,
                   help=f"memory budget of loaded compressed contexts (default {d.cache_mib})")
    p.add_argument("--window-batch-size", type=int, default=d.window_batch_size,
                   help=f"windows encoded per compression step (default {d.window_batch_size})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="who runs the decoder: this process (transformers, default) or vLLM (needs .venv-vllm: "
                        "bash scripts/vllm_env.sh)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM engine: longest slots + prompt + answer (default: the decoder's position limit)")


def cmd_serve(args) -> int:
    """Serve compressed contexts over HTTP (see the README's Serving section)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RCCError("rcc serve needs the serve extra: pip install 'rcc-llm[serve]'") from None
    from .app import serve

    cfg = ServeConfig(model=args.model, host=args.host, port=args.port, store=args.store or "",
                      api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                      max_context_tokens=args.max_context_tokens, max_concurrent=args.max_concurrent,
                      max_batch=args.max_batch, max_new_tokens=args.max_new_tokens, cache_mib=args.cache_mib,
                      window_batch_size=args.window_batch_size, device=args.device, dtype=args.dtype,
                      engine=args.engine, max_model_len=args.max_model_len)
    serve(cfg)
    return 0
