"""The strings that tie serve-unlearn's vLLM pieces together: one source for each, read by the launcher, the
middleware, the hot-load client and the tests."""

from __future__ import annotations

LOAD_FORMAT = "serve_unlearn"                                   # --load-format
MIDDLEWARE = "serve_unlearn.serving.vllm.O3Middleware"          # --middleware
STATUS_PATH = "/serve-unlearn/status"                           # the middleware's own (admin-only) route
ADMIN_HEADER = "x-serve-unlearn-admin"                          # the admin token, or Authorization: Bearer
REGISTRY_ENV = "SERVE_UNLEARN_REGISTRY"                         # the registry folder of a serving process
CONFIG_ENV = "SERVE_UNLEARN_CONFIG"                             # its VllmServeConfig YAML
SERVED_MODELS_ENV = "SERVE_UNLEARN_SERVED_MODELS"               # JSON list of the names vLLM serves the base as
ADMIN_TOKEN_ENV = "SERVE_UNLEARN_ADMIN_TOKEN"                   # default of VllmServeConfig.admin_token_env
