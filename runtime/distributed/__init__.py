"""Quiver past one machine: replicas on Ray Serve, routed by adapter (README "Ray Serve").

    app.py        build_app / app_builder: the ingress + N replica deployments, their options
    ingress.py    HTTP in; `model` -> Serve's multiplexed_model_id; a lost replica -> 503
    replica.py    one Quiver server per replica: the OpenAI routes in-process, multiplexed adapters
    asgi.py       one HTTP exchange with an ASGI app as a stream of parts (the routes' seam)
    directory.py  the live replicas and their own ports (GET /v1/replicas)
    cli.py        `quiver serve-ray`

Adapters come from a store every replica shares (runtime/adapters/s3_store.py).
"""
