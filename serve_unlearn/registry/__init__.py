"""The forget-request registry: the ledger of every forget request, which are in force, and their artifacts.

``ForgetRegistry(root)`` keeps its rows in SQLite inside ``root`` or, for replicas, in PostgreSQL
(``database=`` / ``$SERVE_UNLEARN_REGISTRY_DATABASE``). ``adapters`` registers requests in it and ``serving``
reads it; the registry itself knows nothing of what the artifacts are. Importing it needs no torch.
"""

from .forget_registry import DATABASE_ENV, ForgetRegistry, Staging, check_name
from .queue import ForgetQueue, Job
from .store import ForgetRequest, Owner

__all__ = ["DATABASE_ENV", "ForgetQueue", "ForgetRegistry", "ForgetRequest", "Job", "Owner", "Staging",
           "check_name"]
