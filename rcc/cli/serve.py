"""``rcc serve`` and ``rcc export-vllm``: the HTTP server and the decoder folder
``vllm serve`` runs (imports no web framework or vLLM until a command runs, so the
CLI works without the ``serve`` extra)."""

from __future__ import annotations

import argparse

from rcc.errors import RCCError
from rcc.report import names_list
from rcc.serve.config import ENGINES, ServeConfig, default_store, read_api_key

#: (option, help) of the limits and timeouts, each a ServeConfig field of the same name;
#: docs/serving.md says what each protects against
LIMITS = (
    ("--max-context-tokens", "longest document accepted; 413 beyond"),
    ("--max-question-tokens", "longest question (or last user message); 413 beyond"),
    ("--max-stop-strings", "stop strings one request may give; 413 beyond"),
    ("--max-stop-chars", "longest stop string; 413 beyond"),
    ("--max-messages", "longest chat message list; 413 beyond"),
    ("--max-name-chars", "longest document name; 413 beyond"),
    ("--max-body-bytes", "largest request body but a document upload; 413 before it is read"),
    ("--max-header-bytes", "largest request line and headers; 431 beyond"),
    ("--max-connections", "open connections at once; 503 and closed beyond"),
    ("--max-concurrent", "questions waiting or running at once; 429 beyond"),
    ("--max-batch", "questions on one context answered together"),
    ("--max-contexts-per-question", "contexts one question may read together (context_ids); 413 beyond"),
    ("--max-new-tokens", "largest max_tokens a request may ask for"),
    ("--cache-mib", "memory budget of loaded compressed contexts"),
    ("--window-batch-size", "windows encoded per compression step"),
)
TIMEOUTS = (
    ("--header-timeout", "seconds a client has to send its request line and headers; 408 and closed after"),
    ("--body-timeout", "seconds a client has to send its request body; 408 and closed after"),
    ("--keep-alive-timeout", "seconds an idle keep-alive connection stays open"),
)


def _attr(option: str) -> str:
    return option[2:].replace("-", "_")


def _names(value: str) -> tuple[str, ...]:
    return tuple(names_list(value))


def serve_args(p: argparse.ArgumentParser) -> None:
    from rcc.bundled import DEFAULT_MODEL

    d = ServeConfig(store="-")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the bundled {DEFAULT_MODEL} (default) or a checkpoint")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only; "
                                                  "any other needs --api-key-file or --insecure)")
    p.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    p.add_argument("--store", help=f"folder of compressed contexts and their index (default {default_store()}); "
                                   "one server at a time")
    p.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY' with the key in this file")
    p.add_argument("--insecure", action="store_true", help="allow a --host other than loopback without a key")
    p.add_argument("--allowed-hosts", type=_names, default=(),
                   help="comma-separated Host names to accept besides localhost and IP addresses ('*': any; "
                        "turns off the DNS-rebinding check)")
    p.add_argument("--cors-origins", type=_names, default=(),
                   help="comma-separated origins (https://app.example) whose web pages may call the API "
                        "(default: none, CORS off)")
    for option, text in LIMITS:
        p.add_argument(option, type=int, default=getattr(d, _attr(option)),
                       help=f"{text} (default {getattr(d, _attr(option))})")
    p.add_argument("--max-document-bytes", type=int, default=None,
                   help="largest document upload; 413 before it is read (default: 32 bytes per "
                        "--max-context-tokens, at least 1 MiB)")
    for option, text in TIMEOUTS:
        p.add_argument(option, type=float, default=getattr(d, _attr(option)),
                       help=f"{text} (default {getattr(d, _attr(option)):g})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="who runs the decoder: this process (transformers, default) or vLLM (needs .venv-vllm: "
                        "bash scripts/vllm_env.sh)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM engine: longest slots + prompt + answer (default: the decoder's position limit)")


def config_from_args(args) -> ServeConfig:
    """The :class:`ServeConfig` of ``rcc serve``'s arguments.

    Raises:
        RCCError: for a bad setting or an unreadable key file.
    """
    limits = {_attr(o): getattr(args, _attr(o)) for o, _ in LIMITS + TIMEOUTS}
    return ServeConfig(model=args.model, host=args.host, port=args.port, store=args.store or "",
                       api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                       insecure=args.insecure, allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins,
                       max_document_bytes=args.max_document_bytes, device=args.device, dtype=args.dtype,
                       engine=args.engine, max_model_len=args.max_model_len, **limits)


def cmd_serve(args) -> int:
    """Serve compressed contexts over HTTP (see the README's Serving section)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RCCError("rcc serve needs the serve extra: pip install 'rcc-llm[serve]'") from None
    cfg = config_from_args(args)
    from rcc.serve.app import serve

    serve(cfg)
    return 0


def export_args(p) -> None:
    """``rcc export-vllm``'s options: the model (as ``rcc ask`` names it), the dtype, the folder."""
    from rcc.bundled import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the bundled {DEFAULT_MODEL} (default) or a checkpoint")
    p.add_argument("--base-model", help="config (and tokenizer) of the released layout")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight dtype of the folder (default float32)")
    p.add_argument("-o", "--output", required=True, help="folder to write (then: vllm serve FOLDER ...)")


def cmd_export(args) -> int:
    """Export a model's decoder for ``vllm serve`` (docs/vllm.md)."""
    import torch

    from rcc.loading import load_model
    from rcc.vllm.export import export_decoder

    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, base_model=args.base_model, dtype=dtype)
    folder = export_decoder(model, args.output, dtype=dtype)
    print(f"rcc: wrote {folder} (model id {model.fingerprint()}); serve it with: vllm serve {folder} "
          "--enable-mm-embeds --enforce-eager --block-size 32")
    return 0
