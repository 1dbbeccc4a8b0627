"""Where a study lives: Optuna's RDB storage (SQLite for one machine, PostgreSQL for many workers).

Every worker of a study opens the storage with a heartbeat: a running trial whose worker stops
beating (killed, preempted, lost its network) for ``grace`` seconds is failed by the next worker
that asks for a trial, and RetryHeartbeatStaleTrialCallback enqueues its parameters and user attrs
again, so another worker verifies the same plan. This is Optuna's own mechanism; paretoq adds
nothing beside it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from paretoq.errors import ParetoqError

if TYPE_CHECKING:
    import optuna

DEFAULT_STORAGE = "sqlite:///studies/paretoq.db"
HEARTBEAT_SECONDS = 30  # a trial on a large model runs minutes; the heartbeat thread beats meanwhile
GRACE_BEATS = 3  # missed beats before a running trial counts as dead
MAX_RETRIES = 3  # a plan that kills its worker this often is left failed

# scheme://user:PASSWORD@host...: the password runs to the last "@" before the path, so one that
# holds an unencoded "@" is still masked whole (SQLAlchemy's own rendering leaks its tail).
_CREDENTIALS = re.compile(r"^([A-Za-z][\w+.-]*://[^:/@]*):([^/]*)@")


def mask_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, for logs and reports."""
    return _CREDENTIALS.sub(r"\1:***@", url)


def _password(url: str) -> str | None:
    m = _CREDENTIALS.match(url)
    return m.group(2) if m else None


def open_storage(url: str | None = None, heartbeat: int = HEARTBEAT_SECONDS) -> optuna.storages.RDBStorage:
    import optuna  # here, not at the top: the CLI reads this module's constants at start-up

    url = url or DEFAULT_STORAGE
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        try:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ParetoqError(f"cannot create the directory of storage {mask_url(url)} ({exc.strerror}); "
                               "pass --storage a writable location") from None
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 and what workers need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=GRACE_BEATS * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                # SQLite: wait for another worker's write instead of failing with "database is locked".
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                else {"pool_pre_ping": True})
        except ModuleNotFoundError as exc:
            raise ParetoqError(f"storage {mask_url(url)} needs the Python package {exc.name!r}; "
                               f"pip install {'psycopg2-binary' if exc.name == 'psycopg2' else exc.name}") from None
        except Exception as exc:  # SQLAlchemy's ArgumentError, OperationalError, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = reason.replace(url, mask_url(url))
            password = _password(url)
            if password:
                reason = reason.replace(password, "***")
            raise ParetoqError(f"cannot open storage {mask_url(url)} ({reason[:200]}); check the URL, that the "
                               "database server runs and is reachable, and the credentials") from None
