"""The OpenAI-compatible HTTP front end: thin routes over the same Core the gRPC servicers use.

    app.py      the FastAPI app + the uvicorn server on its own thread (HttpServer)
    routes.py   /v1/chat/completions, /v1/completions, /v1/models, vLLM's adapter routes,
                /health, /metrics
    schemas.py  strict request models; fields Quiver refuses by name
    convert.py  OpenAI bodies <-> GenerateCall / engine Outputs
    bridge.py   blocking engine Handles -> one asyncio queue (the event loop never blocks)
    sse.py      server-sent events framing
    errors.py   OpenAI error objects from the shared domain error table (server/errors.py)
    access.py   bearer tokens (server/auth.py's rules), body size cap
"""
