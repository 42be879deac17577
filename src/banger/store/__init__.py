"""banger's SQLite state: connection handling (`db`), schema history (`migrations`) and the record
mappings (`vms`, `images`, `kernels`).

Importing this package imports sqlite3; the CLI must not import it at start-up.
"""

from __future__ import annotations

from banger.store.db import Store, connect, open_db, open_readonly
from banger.store.migrations import MIGRATIONS, Migration, SchemaState, inspect_path, migrate, schema_state

__all__ = [
    "MIGRATIONS",
    "Migration",
    "SchemaState",
    "Store",
    "connect",
    "inspect_path",
    "migrate",
    "open_db",
    "open_readonly",
    "schema_state",
]
