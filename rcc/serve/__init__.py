"""``rcc serve``: an HTTP service over the Python API that compresses a document
once and answers many questions about it, for many clients.

- :mod:`.config`: :class:`ServeConfig`, every server setting and its default;
- :mod:`.store`: memory files on disk plus a SQLite index, surviving restarts;
- :mod:`.engine`: one worker thread that owns the model: compression jobs,
  batched questions over one shared memory, an LRU of loaded memories;
- :mod:`.vllm_engine`: the same engine with the decoder in vLLM (``--engine vllm``; :mod:`rcc.vllm`);
- :mod:`.app`: the FastAPI app, one router per area (validate, call the engine, serialise);
- ``page.html``: the web page at ``/``.

Nothing here is imported by the library; FastAPI and uvicorn (the ``serve``
extra) are imported only when a server is built.
"""

from rcc.serve.config import ServeConfig

__all__ = ["ServeConfig"]
