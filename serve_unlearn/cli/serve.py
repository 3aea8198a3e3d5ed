"""``serve-unlearn serve --config FILE``: the HTTP service (forget requests and/or object removal);
``serve-unlearn worker --config FILE``: one more training worker (another host sharing a PostgreSQL registry)."""

from __future__ import annotations

import logging


def _serve(args) -> int:
    from ..service.config import ServeConfig

    config = ServeConfig.from_yaml(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.engine == "ray":
        from ..service.ray_engine import run_on_ray

        run_on_ray(config, args.host, args.port)
        return 0
    import uvicorn

    from ..service.app import create_app

    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=30)
    return 0


def _worker(args) -> int:
    from ..service.worker import main

    return main(["--config", args.config] + (["--max-jobs", str(args.max_jobs)] if args.max_jobs else []))


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the HTTP service: forget requests (control plane) and object removal",
                       description="FastAPI + uvicorn; configs/serve.yaml documents every key.")
    s.add_argument("--config", required=True, help="YAML ServeConfig, e.g. configs/serve.yaml")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--engine", choices=("embedded", "ray"), default="embedded",
                   help="embedded: one uvicorn process (default); ray: replicas on Ray Serve (object removal)")
    s.set_defaults(func=_serve)
    w = sub.add_parser("worker", help="run one training worker for a service's forget-request queue")
    w.add_argument("--config", required=True, help="the service's YAML config")
    w.add_argument("--max-jobs", type=int, help="stop after this many forget requests")
    w.set_defaults(func=_worker)
