"""The shard folder's index.json: its format tag, shard names and the reader every consumer uses.

    {"format": "dinoray-shards/1", "total": N, "classes": [...],
     "shards": [{"name": "shard-000000.tar", "count", "bytes", "sha256", "plan"}, ...],
     "skipped": [{"source", "reason", "shard"}, ...], "params": {...build parameters...}}

No entrypoint; written by orchestrator.data.build, read by the loader, verify, the controller's
preflight and the k-NN evaluation.
"""

from __future__ import annotations

import json

from orchestrator import storage
from orchestrator.storage import Store

FORMAT = "dinoray-shards/1"
INDEX = "index.json"


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def read_index(where: Store) -> tuple[dict, Store]:
    """Load index.json given the shard folder or the index.json itself; returns (index, folder)."""
    index_file = where if where.url.endswith(".json") else where / INDEX
    try:
        raw = index_file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.redact(index_file.url)} not found; build shards with "
                                f"`dinoray shards build SRC DST` first") from None
    except Exception as e:  # noqa: BLE001
        raise OSError(f"cannot read {storage.describe_error(index_file.url, e)}") from None
    try:
        index = json.loads(raw)
        assert index.get("format") == FORMAT and isinstance(index.get("shards"), list)
    except (ValueError, AssertionError):
        raise ValueError(f"{storage.redact(index_file.url)} is not a dinoray shard index (format {FORMAT}); "
                         f"rebuild with `dinoray shards build`") from None
    return index, index_file.parent
