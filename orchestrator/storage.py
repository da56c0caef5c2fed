"""fsspec helpers shared by the shard builder and the training loader.

- `fs_for(url, storage_options)` -> (fsspec filesystem, path). For s3:// the endpoint and region come
  from the standard AWS environment variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION);
  keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (read by botocore itself, never copied
  into our objects) or from `storage_options` (job spec). Timeouts are bounded so that an unreachable
  bucket fails with a clear error instead of hanging.
- `open_url(url)` / `Store.open()`: a file object on any fsspec URL (large read-ahead for object
  stores); shards are read through it, so no global scheme table (webdataset's gopen) is touched.
- `atomic_write_bytes(url, data)` / `atomic_put_file(local, url)`: a reader never sees a half-written
  object. Local files: write a temporary file in the same folder, fsync, then os.replace. Object
  stores: a PUT (single or multipart) only becomes visible when complete, so we write directly.
- `redact(obj)` removes credentials from strings, URLs and (nested) dicts before anything is logged
  or written to index.json.

No entrypoint; used by `dinoray shards ...` and `orchestrator.data.loader`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Any

import fsspec

# Object stores where a single PUT is atomic (the object appears only once fully written).
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING")
_SECRET_KEY_RE = re.compile(r"(key|secret|token|password|passwd|credential|signature|auth)", re.I)
_URL_USERINFO_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_QUERY_SECRET_RE = re.compile(r"(?i)((?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|token|key)=)[^&\s]+")
# Bounded network behaviour for S3: a dead endpoint fails in seconds, not minutes.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}


def protocol_of(url: str) -> str:
    """'s3' for s3://b/k, 'file' for /a/b or file:///a/b."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def s3_options_from_env(env: dict | None = None) -> dict:
    """storage_options for s3fs built from the standard AWS environment (endpoint and region only)."""
    env = os.environ if env is None else env
    opts: dict[str, Any] = {"config_kwargs": dict(S3_CONFIG)}
    client: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    return opts


def _merge(base: dict, extra: dict | None) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def storage_options_for(url: str, storage_options: dict | None = None) -> dict:
    """Effective fsspec options: environment defaults for s3, overridden by explicit storage_options."""
    if protocol_of(url) in ("s3", "s3a"):
        opts = s3_options_from_env()
        # s3fs also accepts endpoint_url at top level; normalise it into client_kwargs.
        so = dict(storage_options or {})
        if "endpoint_url" in so:
            so.setdefault("client_kwargs", {})["endpoint_url"] = so.pop("endpoint_url")
        return _merge(opts, so)
    return dict(storage_options or {})


def fs_for(url: str, storage_options: dict | None = None):
    """Return (fsspec filesystem, path inside it) for a local path or any fsspec URL."""
    if not url:
        raise ValueError("empty storage URL; give a local path or an fsspec URL such as s3://bucket/prefix")
    opts = storage_options_for(url, storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise ValueError(f"cannot open storage URL {redact(url)!r}: {redact(str(e))} "
                         f"(install the fsspec backend for {protocol_of(url)}:// or fix the URL)") from None
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL/path components with '/' (no normalisation of the scheme part)."""
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def describe_error(url: str, exc: BaseException) -> str:
    """One line explaining a storage failure, credentials removed, with a hint how to fix it."""
    hint = ""
    if protocol_of(url) in ("s3", "s3a"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
        hint = (f" [endpoint {ep}; check the bucket name, AWS_ENDPOINT_URL, AWS_REGION and that "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are set and valid]")
    return redact(f"{type(exc).__name__} on {url}: {exc}{hint}")


# ----------------------------------------------------------------------------------------- writes

def _tmp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{uuid.uuid4().hex[:12]}")


def _replace_local(path: str, fill) -> None:
    """Create local `path` atomically: `fill(f)` writes a temporary file beside it, fsync, os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _commit_remote(url: str, fs, path: str, put) -> None:
    """Create remote `path` atomically with `put(target)`: directly on object stores (a PUT appears
    only when complete), else through a temporary name and a move."""
    if protocol_of(url) in _OBJECT_STORES:
        put(path)
        return
    tmp = _tmp_name(path)
    put(tmp)
    fs.mv(tmp, path)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so that readers see either nothing/the old object or the complete new one."""
    fs, path = fs_for(url, storage_options)
    if protocol_of(url) == "file":
        _replace_local(path, lambda f: f.write(data))
    else:
        _commit_remote(url, fs, path, lambda target: fs.pipe_file(target, data))


def atomic_put_file(local_path: str, url: str, storage_options: dict | None = None, move: bool = False) -> None:
    """Commit a finished local file to `url` atomically (rename locally, single/multipart PUT remotely).

    move=True lets a local destination on the same filesystem take the file by rename (no copy).
    """
    fs, path = fs_for(url, storage_options)
    if protocol_of(url) != "file":
        _commit_remote(url, fs, path, lambda target: fs.put_file(local_path, target))
        return
    if move:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        try:
            os.replace(local_path, path)
            return
        except OSError:
            pass  # other filesystem: copy below

    def copy(dst):
        with open(local_path, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 22)
    _replace_local(path, copy)


# ------------------------------------------------------------------------------------------ reads

def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, block_size: int = 1 << 23):
    """Open a file-like object for reading/writing through fsspec (sequential, large read-ahead)."""
    fs, path = fs_for(url, storage_options)
    if protocol_of(url) == "file":
        return open(path, mode)
    return fs.open(path, mode, block_size=block_size, cache_type="readahead")


# ------------------------------------------------------------------------------------- redaction

def _secret_values() -> list[str]:
    vals = [os.environ.get(k, "") for k in _SECRET_ENV]
    return [v for v in vals if len(v) >= 4]


def redact(obj: Any, extra_secrets: tuple[str, ...] = ()) -> Any:
    """Return a copy of `obj` with credentials replaced by '***'.

    Strings: values of the AWS/GCS/Azure secret env vars, URL user-info (user:pass@) and signed-URL
    query parameters. Dicts: any key that looks like a secret (key/secret/token/password/...); other
    values are redacted recursively. Lists/tuples recursively.
    """
    secrets = _secret_values() + [s for s in extra_secrets if s]
    if isinstance(obj, str):
        s = obj
        for v in secrets:
            s = s.replace(v, "***")
        s = _URL_USERINFO_RE.sub(lambda m: m.group("scheme") + "***@", s)
        return _QUERY_SECRET_RE.sub(lambda m: m.group(1) + "***", s)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY_RE.search(k) and isinstance(v, (str, bytes, int)):
                out[k] = "***"
            else:
                out[k] = redact(v, extra_secrets)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, extra_secrets) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------ Store

class Store:
    """A storage location: a URL (local path or any fsspec URL) together with its options.

    Everything that reads or writes run files takes a Store, so no caller ever carries a URL and
    its options as two parameters, and nothing outside this module branches on local vs remote.
    `store / "a" / "b"` is a child location. Writes are atomic (see `atomic_write_bytes`)."""

    __slots__ = ("url", "options")

    def __init__(self, url: str, options: dict | None = None):
        if not url:
            raise ValueError("empty storage URL; give a local path or an fsspec URL such as s3://bucket/prefix")
        self.url = url.rstrip("/") or "/"
        self.options = dict(options or {})

    def __truediv__(self, part: str) -> "Store":
        return Store(join(self.url, str(part)), self.options)

    def __repr__(self) -> str:
        return f"Store({redact(self.url)!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and (self.url, self.options) == (other.url, other.options)

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):  # picklable for Ray tasks and workers
        return (Store, (self.url, self.options))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Store":
        """The folder holding this location (same options)."""
        head = self.url.rsplit("/", 1)[0] if "/" in self.url else "."
        return Store(head or "/", self.options)

    @property
    def is_local(self) -> bool:
        return protocol_of(self.url) == "file"

    @property
    def local_path(self) -> str | None:
        """The absolute filesystem path of a local location, None for a remote one."""
        return os.path.abspath(fs_for(self.url)[1]) if self.is_local else None

    def fs(self):
        """(fsspec filesystem, path inside it)."""
        return fs_for(self.url, self.options)

    def fsspec_options(self) -> dict:
        """The effective fsspec keyword arguments (environment defaults + the job's options)."""
        return storage_options_for(self.url, self.options)

    def exists(self) -> bool:
        fs, path = self.fs()
        if not self.is_local:
            fs.invalidate_cache()
        return fs.exists(path)

    def isdir(self) -> bool:
        fs, path = self.fs()
        return fs.isdir(path)

    def ls(self) -> list[str]:
        """Names (not paths) of the entries directly under this location; [] if it does not exist."""
        fs, path = self.fs()
        fs.invalidate_cache()
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def size(self) -> int:
        """Size in bytes; FileNotFoundError when there is nothing here."""
        fs, path = self.fs()
        return fs.size(path)

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes here, or those in [start, end) (one ranged GET on object stores)."""
        fs, path = self.fs()
        return fs.cat_file(path, start=start, end=end)

    def read_json(self, default: Any = None) -> Any:
        """The parsed JSON object here, or `default` when there is none."""
        import json
        if not self.exists():
            return default
        return json.loads(self.read_bytes())

    def read_jsonl(self) -> list[dict]:
        import json
        if not self.exists():
            return []
        return [json.loads(ln) for ln in self.read_bytes().decode().splitlines() if ln.strip()]

    def write_bytes(self, data: bytes) -> None:
        atomic_write_bytes(self.url, data, self.options)

    def write_json(self, obj: Any) -> None:
        import json
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def put_file(self, local_path: str, move: bool = False) -> None:
        atomic_put_file(local_path, self.url, self.options, move=move)

    def open(self, mode: str = "rb"):
        return open_url(self.url, mode, self.options)

    def rm(self, recursive: bool = False) -> None:
        """Remove this file (or folder, with recursive=True); a missing one is not an error."""
        fs, path = self.fs()
        if not self.is_local:
            fs.invalidate_cache()
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            return
        if recursive and not self.is_local:  # stores with real folders (SeaweedFS) keep an empty one
            fs.invalidate_cache()
            try:
                fs.rm(path.rstrip("/") + "/")
            except (FileNotFoundError, OSError):
                pass

    def staging_dir(self, prefix: str = "dinoray-") -> tuple[str, bool]:
        """A local folder to write this location's files into: the location itself when it is local
        (returns (path, False)), else a fresh temporary folder to upload from (returns (tmp, True))."""
        if self.is_local:
            os.makedirs(self.local_path, exist_ok=True)
            return self.local_path, False
        import tempfile
        return tempfile.mkdtemp(prefix=prefix), True

    def upload_dir(self, local_dir: str) -> None:
        """Copy every file under `local_dir` to the same relative path under this location."""
        for dirpath, _, files in os.walk(local_dir):
            for fn in files:
                full = os.path.join(dirpath, fn)
                (self / os.path.relpath(full, local_dir).replace(os.sep, "/")).put_file(full)

    def download_dir(self, local_dir: str) -> None:
        fs, path = self.fs()
        fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
