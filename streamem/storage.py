"""Stores that are not local paths: URLs through fsspec, and any ``zarr`` store object.

Every place in streamem that takes a path (the data of ``fit``, ``partial_fit``,
``update`` and the prediction methods, model files, checkpoints, the statistics
stores of ``accumulate``/``reduce``, ``--out`` of ``streamem predict``) also
takes

- a URL: ``s3://``, ``gs://``, ``az://``/``abfs://``, ``https://``, ... opened
  with :class:`zarr.storage.FsspecStore` (the backend's package must be
  installed: ``s3fs`` - the ``s3`` extra -, ``gcsfs``, ``adlfs``, ``aiohttp``);
- a ``zarr`` store object (``zarr.storage.ObjectStore`` over obstore,
  ``FsspecStore``, ``MemoryStore``, ...), used as it is; checkpoints, which
  are directories of several stores, need a local path or a URL.

Options of the backend (endpoint, region, credentials) are given as
``storage_options=`` (a mapping passed to fsspec, as xarray and dask take it);
one mapping applies to every URL of a call. Credentials are best left to the
backend's usual environment and configuration files (for S3: ``AWS_*``
variables, ``~/.aws``, instance roles). Wherever they come from, they are never
written: not into a model file, a checkpoint or a statistics store (these
record the URL without user name or password, and an ``http(s)://`` URL
without its query: see :func:`public_url`), nor into a log line or an error
message (:func:`redact` removes the values of options whose name says they
are secret, and user information of URLs). Credentials written into an
object-store URL (``s3://KEY:SECRET@bucket/...``; ``gs://``, ``az://`` too)
are refused before anything is opened (:func:`check_no_credentials`).

Defaults that keep a failure short (:data:`DEFAULT_STORAGE_OPTIONS`, merged
under the options given, which win key by key): S3 connects within 5 s, waits
at most 20 s for a read and tries a request at most twice; HTTP(S) the same
timeouts; s3fs's listing cache is off, so that a store another process wrote
is seen at once. The first contact with a store (does it exist, what is there)
is bounded as a whole by :data:`PROBE_TIMEOUT`. An unreachable endpoint, a
missing bucket or a missing key is then one line (an :class:`OSError`:
``ConnectionError``, ``TimeoutError``, ``FileNotFoundError``,
``PermissionError``) naming the URL.

Complete-or-absent on object storage (:func:`write_store`). Object stores
cannot rename a directory, but a single object appears whole or not at all.
A Zarr v3 store is known by its root metadata object ``zarr.json``, and
streamem treats a prefix without it as *absent*. So a store is written as
follows: (1) a marker object ``.streamem-writing`` is put, holding a token
unique to this write (on S3 with a conditional put, ``If-None-Match: *``);
(2) when a store is replaced (``overwrite=True``, only a store streamem
wrote), its root ``zarr.json`` is deleted first - from then on readers see
no store -, then its other objects; (3) every array (metadata and chunks) is
written, the writer refreshing its marker (a heartbeat) at most every
:data:`HEARTBEAT` seconds as it goes; (4) the root ``zarr.json`` is put
last - the commit -, only if the marker still holds this write's token and
no ``zarr.json`` is there (a conditional put on S3); (5) the marker is
deleted. A write interrupted before (4) leaves no store at the URL (readers
get ``FileNotFoundError``, never half a store); an interrupted overwrite
leaves no store either: the old one is gone from step (2). To keep an old
model readable while its successor is written, save the successor to a new
URL. Checkpoints need no such gap: each state is a new store and the small
``LATEST`` object, replaced in one request after the state is committed,
names the current one (see :mod:`streamem.checkpoint`).

Two writers of one URL. A write that finds another write's marker is
refused (``FileExistsError``, with ``overwrite=True`` too) while that marker
is *live*; a *stale* marker - its writer ran on this host and has ended, or
its last heartbeat is more than :data:`STALE_AFTER` seconds (10 minutes)
old - is an interrupted write's, and the new write takes the place over and
removes what it left. A writer whose marker was taken over (it was silent
too long) stops at its next heartbeat or at its commit, and commits nothing.
So of two writers one commits, the other is told; a writer silent for more
than :data:`STALE_AFTER` seconds between two objects (clocks of the two
machines more than that apart) can lose its place to a newer write.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import time
import uuid
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import WrapperStore

#: Seconds the first contact with a store may take in all (retries included).
PROBE_TIMEOUT = 30.0
#: Backend options streamem sets unless they are given (per URL scheme); see the module docstring.
DEFAULT_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2, "mode": "standard"}},
        "use_listings_cache": False,
    },
}
#: HTTP(S): aiohttp's timeouts (built when needed: aiohttp is imported only for http URLs).
_HTTP_TIMEOUTS = {"connect": 5, "sock_connect": 5, "sock_read": 20}
#: The root metadata of a Zarr v3 store (the commit of a write) and of v2 stores.
ROOT = "zarr.json"
_V2_ROOTS = (".zgroup", ".zarray")
#: The object that marks a prefix as a store streamem is writing (or was, when interrupted).
WRITING = ".streamem-writing"
#: Seconds after its last heartbeat a writer's marker counts as abandoned (an interrupted write).
STALE_AFTER = 600.0
#: Seconds between a writer's heartbeats (refreshes of its marker while it writes objects).
HEARTBEAT = 60.0
#: Option names whose values are secret (matched as parts of the name, case-insensitively).
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|sas|auth|signature|connection_string|cookie", re.I)
#: The packages fsspec needs for common schemes (named in the error when one is missing).
_BACKENDS = {"s3": "s3fs (pip install 'streamem[s3]')", "s3a": "s3fs (pip install 'streamem[s3]')", "gs": "gcsfs",
             "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}  # fmt: skip
#: Azure's schemes: ``CONTAINER@ACCOUNT`` in the netloc is no credential.
_AZURE = ("az", "abfs", "abfss")
#: Schemes whose URLs never carry credentials (a user name or password there is refused, see check_no_credentials).
_NO_USERINFO = ("s3", "s3a", "gs", "gcs", *_AZURE)


# ------------------------------------------------------------------ what a location is
def is_url(location: Any) -> bool:
    """Whether ``location`` is a URL of a remote store (``file://`` URLs are local paths)."""
    if not isinstance(location, str):
        return False
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", location) is not None and not location.startswith("file://")


def is_store(location: Any) -> bool:
    """Whether ``location`` is a ``zarr`` store object."""
    return isinstance(location, Store)


def is_remote(location: Any) -> bool:
    """Whether ``location`` is read and written through a zarr store: a URL or a store object."""
    return is_url(location) or is_store(location)


def public_url(url: str) -> str:
    """``url`` as it may be shown and recorded: no credentials, no trailing ``/``.

    A user name or password in the netloc is dropped, except the container of
    an Azure URL (``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/path``: the
    part before ``@`` names the container there, unless it holds a ``:``).
    Of ``http(s)://`` URLs the query (a signed URL's signature) and the
    fragment are dropped too; other schemes keep everything after the netloc,
    since object keys may hold ``?`` and ``#`` (s3fs keeps them in the key).
    """
    scheme, _, rest = url.partition("://")
    if scheme.lower() in ("http", "https"):
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
    netloc, slash, path = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if at and not _is_container(scheme, user):
        netloc = host
    return f"{scheme}://{netloc}{slash}{path}".rstrip("/")


def _is_container(scheme: str, user: str) -> bool:
    """Whether ``user@`` of a ``scheme`` URL names an Azure container rather than a credential."""
    return scheme.lower() in _AZURE and ":" not in user


def check_no_credentials(url: str) -> None:
    """Refuse an object-store URL with credentials in it (``s3://KEY:SECRET@bucket/...``).

    s3fs and gcsfs would take them for part of the bucket name, and they
    would reach messages; the message here does not show them.

    Raises
    ------
    ValueError
        Naming the URL without its credentials.
    """
    scheme, _, rest = url.partition("://")
    user, at, _ = rest.partition("/")[0].rpartition("@")
    if at and scheme.lower() in _NO_USERINFO and not _is_container(scheme, user):
        raise ValueError(
            f"{public_url(url)}: credentials in the URL: pass them as storage options or the backend's environment "
            f"(a {scheme}:// URL takes no user name or password)"
        )


def describe(location: Any) -> str:
    """A location in words for messages and provenance: a URL (public part), a path, or a store's name."""
    if is_url(location):
        return public_url(location)
    if is_store(location):
        return store_name(location)
    return os.fspath(location)


def store_name(store: Store, path: str = "") -> str:
    """Where a store (and ``path`` in it) lives, as a URL when it has one."""
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(store, "path"):
        full = "/".join(p for p in (str(store.path).rstrip("/"), path) if p)
        try:
            return public_url(fs.unstrip_protocol(full))
        except Exception:  # a file system that cannot say: its protocol is enough
            pass
    root = getattr(store, "root", None)
    if root is not None:  # LocalStore
        return os.path.join(os.fspath(root), path) if path else os.fspath(root)
    name = str(store)
    return f"{name}/{path}" if path else name


def join(url: str, name: str) -> str:
    """The URL of entry ``name`` under ``url``."""
    return f"{url.rstrip('/')}/{name}"


# ------------------------------------------------------------------ options and secrets
def storage_options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options a URL is opened with: :data:`DEFAULT_STORAGE_OPTIONS` of its scheme under ``storage_options``.

    Raises
    ------
    TypeError
        ``storage_options`` is not a mapping.
    """
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options must be a dict of backend options, got {type(storage_options).__name__}")
    scheme = url.split("://", 1)[0].lower()
    defaults = copy.deepcopy(DEFAULT_STORAGE_OPTIONS.get(scheme, {}))
    if scheme in ("http", "https") and "timeout" not in (storage_options or {}).get("client_kwargs", {}):
        import aiohttp

        defaults["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(**_HTTP_TIMEOUTS)}
    return _merge(defaults, storage_options or {})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def secrets(options: Any) -> list[str]:
    """The values of ``options`` (nested mappings and lists too) under names that say they are secret."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or bool(_SECRET_NAME.search(str(k))))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and value is not None and not isinstance(value, bool) and len(str(value)) >= 4:
            found.append(str(value))

    walk(options, False)
    return sorted(set(found), key=len, reverse=True)


def store_secrets(store: Any) -> list[str]:
    """The secrets a store's file system was opened with (fsspec keeps its options)."""
    while isinstance(store, WrapperStore):
        store = store._store
    return secrets(getattr(getattr(store, "fs", None), "storage_options", None))


def redact(text: str, options: Any = None, store: Any = None) -> str:
    """``text`` with every secret of ``options`` and ``store`` replaced by ``***``, and URLs without user
    information (``user:password@``, ``TOKEN@``; an Azure container stays) or queries."""
    for secret in secrets(options) + (store_secrets(store) if store is not None else []):
        text = text.replace(secret, "***")

    def userinfo(match: re.Match) -> str:
        scheme, user = match.group(1), match.group(2)
        return match.group(0) if _is_container(scheme, user) else f"{scheme}://***@"

    text = re.sub(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/@\s'\"]*)@", userinfo, text)
    # A query (a signed URL's signature), up to the punctuation that ends the URL in a sentence.
    return re.sub(r"(://[^\s'\"?]*)\?[^\s'\"]*?(?=[:,;)]?(?:\s|$|['\"]))", r"\1?***", text)


# ------------------------------------------------------------------ opening
def open_store(location: Any, storage_options: dict[str, Any] | None = None, *, read_only: bool = False) -> Store:
    """The zarr store of a URL (through fsspec) or a store object as it is.

    Raises
    ------
    ValueError
        The URL's backend package is not installed (naming it), or fsspec
        does not know the scheme.
    """
    if is_store(location):
        return location
    check_no_credentials(location)
    options = storage_options_for(location, storage_options)
    scheme = location.split("://", 1)[0].lower()
    try:
        return zarr.storage.FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    except ImportError:
        package = _BACKENDS.get(scheme, f"the fsspec backend of {scheme}://")
        raise ValueError(f"{public_url(location)}: reading and writing {scheme}:// URLs needs {package}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise ValueError(f"{public_url(location)}: fsspec knows no backend for {scheme}:// URLs") from None
        raise ValueError(redact(f"{public_url(location)}: cannot open it: {exc}", options)) from None
    except TypeError as exc:  # an option the backend does not take
        raise TypeError(redact(f"storage_options for {public_url(location)}: {exc}", options)) from None


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the storage backend or the network rather than from the data."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure", "google", "fsspec", "obstore", "requests", "urllib3")


def storage_error(exc: BaseException, where: str, store: Any = None, options: Any = None) -> OSError:
    """``exc`` of the backend as one line naming ``where``, secrets removed; an OSError of the matching kind."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text.lower():
        kind: type[OSError] = FileNotFoundError
    elif isinstance(exc, PermissionError) or any(s in text for s in ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        kind = PermissionError
    elif isinstance(exc, TimeoutError) or "timeout" in name.lower() or "timed out" in text.lower():
        kind = TimeoutError
    elif "connect" in name.lower() or "connect" in text.lower():
        kind = ConnectionError
    else:
        kind = OSError
    if kind is TimeoutError and isinstance(exc, TimeoutError) and "Coroutine" in text:
        text = f"no answer within {PROBE_TIMEOUT:g} s"
    elif kind is ConnectionError:
        text = f"cannot reach the endpoint ({text})"
    message = redact(f"{where}: {text}" if isinstance(exc, OSError) or kind is not OSError else f"{where}: {name}: {text}", options, store)
    return kind(message)


def run(coro: Any, where: str, store: Any = None, options: Any = None, timeout: float | None | str = "probe") -> Any:
    """Run a store coroutine, within ``timeout`` seconds (default :data:`PROBE_TIMEOUT`; None: no limit);
    a backend error becomes :func:`storage_error`."""
    try:
        return zarr_sync(coro, timeout=PROBE_TIMEOUT if timeout == "probe" else timeout)
    except Exception as exc:
        if is_storage_error(exc):
            raise storage_error(exc, where, store, options) from None
        raise


def read_bytes(store: Store, key: str, where: str) -> bytes | None:
    """The object ``key`` of ``store`` (None when there is none)."""
    buf = run(store.get(key, default_buffer_prototype()), where, store)
    return None if buf is None else buf.to_bytes()


def write_bytes(store: Store, key: str, data: bytes, where: str) -> None:
    """Put the object ``key`` in one request (an object store shows it whole or not at all)."""
    run(store.set(key, default_buffer_prototype().buffer.from_bytes(data)), where, store)


def entries(store: Store, where: str, prefix: str = "") -> list[str]:
    """Names of the objects and "directories" right under ``prefix`` (none when it holds nothing)."""

    async def collect() -> list[str]:
        try:
            return sorted({name.strip("/") async for name in store.list_dir(prefix) if name.strip("/")})
        except FileNotFoundError:  # an empty prefix, on some backends
            return []

    return run(collect(), where, store)


def remove(store: Store, name: str, where: str) -> None:
    """Delete the object ``name`` and everything under the prefix ``name/``."""

    async def delete() -> None:
        await store.delete_dir(name)
        await store.delete(name)

    run(delete(), where, store, timeout=None)


# ------------------------------------------------------------------ complete or absent
def root_attributes(store: Store, where: str) -> dict[str, Any] | None:
    """The attributes of the root of a Zarr store (v3 or v2); None when it has no root metadata."""
    raw = read_bytes(store, ROOT, where)
    if raw is not None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return {"format": "<unreadable zarr.json>"}
        attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
        return attrs if isinstance(attrs, dict) else {}
    if any(read_bytes(store, key, where) is not None for key in _V2_ROOTS):
        raw = read_bytes(store, ".zattrs", where)
        try:
            attrs = json.loads(raw) if raw is not None else {}
        except ValueError:
            attrs = {"format": "<unreadable .zattrs>"}
        return attrs if isinstance(attrs, dict) else {}
    return None


def store_state(store: Store, where: str) -> tuple[str, dict[str, Any] | None]:
    """What a prefix holds: ``("store", attrs)``, ``("absent", None)``, ``("debris", None)`` (an
    interrupted streamem write) or ``("foreign", None)`` (objects that are not a Zarr store)."""
    attrs = root_attributes(store, where)
    if attrs is not None:
        return "store", attrs
    names = entries(store, where)
    if not names:
        return "absent", None
    return ("debris" if WRITING in names else "foreign"), None


def check_bucket(location: Any, storage_options: dict[str, Any] | None, where: str) -> None:
    """Refuse a URL whose bucket (container, first path component) does not exist, or cannot be reached.

    Raises
    ------
    FileNotFoundError, ConnectionError, TimeoutError, PermissionError
    """
    if not is_url(location):
        return
    store = open_store(location, storage_options)
    fs = getattr(store, "fs", None)
    if fs is None or not hasattr(fs, "_exists") or location.split("://", 1)[0].lower() in ("http", "https"):
        return
    bucket = str(store.path).split("/", 1)[0]
    if not run(fs._exists(bucket), where, store):
        raise FileNotFoundError(f"{where}: bucket {bucket!r} does not exist")


class DeferredRootStore(WrapperStore):
    """A store whose root metadata (``zarr.json``) is held back until :meth:`commit`.

    Everything else is written through at once; reads of the root metadata
    are served from what is held, so a writer (xarray, zarr) sees its group.
    Copies (``with_read_only``, pickles sent to workers) share what is held
    in this process; workers only write chunks. With the writer's ``marker``
    (see :func:`write_store`) every copy refreshes it at most every
    :data:`HEARTBEAT` seconds while it writes, and stops the write when the
    marker is another writer's.
    """

    def __init__(
        self, store: Store, held: dict[str, bytes] | None = None, marker: dict[str, Any] | None = None, where: str = ""
    ) -> None:
        super().__init__(store)
        self._held = {} if held is None else held
        self._marker = marker
        self._where = where
        self._beaten = time.time()

    def _with_store(self, store: Store) -> "DeferredRootStore":
        return type(self)(store, self._held, self._marker, self._where)

    async def _heartbeat(self) -> None:
        """Refresh the marker (at most every HEARTBEAT s); refuse to go on when it is not this write's."""
        now = time.time()
        if self._marker is None or now - self._beaten < HEARTBEAT:
            return
        self._beaten = now
        current = _parse_marker(await self._store.get(WRITING, default_buffer_prototype()))
        if current.get("token") != self._marker["token"]:
            raise FileExistsError(f"{self._where!r}: {_SUPERSEDED}")
        doc = json.dumps({**self._marker, "updated": now}).encode()
        await self._store.set(WRITING, default_buffer_prototype().buffer.from_bytes(doc))

    async def set(self, key: str, value: Any) -> None:
        if key == ROOT:
            self._held[ROOT] = value.to_bytes()
            return
        await self._heartbeat()
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if key == ROOT:
            self._held.setdefault(ROOT, value.to_bytes())
            return
        await self._heartbeat()
        await self._store.set_if_not_exists(key, value)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if key == ROOT and ROOT in self._held:
            return prototype.buffer.from_bytes(self._held[ROOT])  # zarr reads metadata whole
        return await self._store.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        if key == ROOT and ROOT in self._held:
            return True
        return await self._store.exists(key)

    async def is_empty(self, prefix: str) -> bool:
        if prefix.strip("/"):
            return await self._store.is_empty(prefix)
        # The marker of the write in progress does not count (zarr's mode "w-" wants an empty store).
        return ROOT not in self._held and not [name async for name in self._store.list_dir("") if name != WRITING]

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        seen = set()
        async for name in self._store.list_dir(prefix):
            if prefix.strip("/") == "" and name == WRITING:
                continue  # not part of the Zarr hierarchy (zarr would warn about it)
            seen.add(name)
            yield name
        if prefix.strip("/") == "" and ROOT in self._held and ROOT not in seen:
            yield ROOT

    def commit(self, where: str) -> None:
        """Put the root metadata: from now on the store exists.

        With a marker: only while the marker is still this write's, and only
        where no root metadata is (a conditional put where the backend has
        one): of two writers, one commits and the other is refused.

        Raises
        ------
        FileExistsError
            Another writer took the place over, or committed first.
        """
        if ROOT not in self._held:
            raise ValueError(f"{where}: the write made no root metadata ({ROOT})")
        if self._marker is None:
            write_bytes(self._store, ROOT, self._held[ROOT], where)
            return
        if read_marker(self._store, where).get("token") != self._marker["token"]:
            raise FileExistsError(f"{where!r}: {_SUPERSEDED}")
        if not put_new(self._store, ROOT, self._held[ROOT], where):
            raise FileExistsError(f"{where!r}: another writer committed a store there while this one wrote; nothing of this write was committed")


#: Why a write stops when its marker was taken over.
_SUPERSEDED = ("another writer took this place over while this write ran (its marker is no longer this write's); "
               "nothing of this write was committed")  # fmt: skip


def _parse_marker(buf: Any) -> dict[str, Any]:
    """A marker's document ({} when there is none or it is not ours to read)."""
    if buf is None:
        return {}
    try:
        doc = json.loads(buf.to_bytes() if hasattr(buf, "to_bytes") else buf)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def read_marker(store: Store, where: str) -> dict[str, Any]:
    """The document of the write marker of ``store`` ({} when there is none)."""
    return _parse_marker(read_bytes(store, WRITING, where))


def new_marker() -> dict[str, Any]:
    """The marker of a new write: a unique token, who writes (host, process and its start) and when."""
    now = time.time()
    return {"writer": "streamem", "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "started": now, "updated": now}  # fmt: skip


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell a reused pid apart; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def marker_is_stale(marker: dict[str, Any], now: float | None = None) -> bool:
    """Whether a write marker is abandoned: its writer is gone, or silent too long.

    Stale when it has no heartbeat time (markers of older streamem
    versions), its last heartbeat is older than :data:`STALE_AFTER`
    seconds, or its writer ran on this host and that process has ended.
    """
    now = time.time() if now is None else now
    updated = marker.get("updated")
    if not isinstance(updated, (int, float)) or now - updated > STALE_AFTER:
        return True
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return False  # another machine's writer: only its heartbeat tells
    pid = marker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    started = _process_start(pid)
    return started is not None and marker.get("pid_start") is not None and started != marker["pid_start"]


def put_new(store: Store, key: str, data: bytes, where: str) -> bool:
    """Put the object ``key`` unless it exists: True when this call created it.

    S3 (s3fs) uses a conditional put (``If-None-Match: *``), atomic on the
    server; other stores use ``set_if_not_exists`` (atomic with obstore) and
    read back what is there: equal bytes count as created.
    """
    fs = getattr(store, "fs", None)
    protocols = getattr(fs, "protocol", ())
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    if "s3" in protocols and hasattr(fs, "_pipe_file") and hasattr(store, "path"):
        path = f"{str(store.path).rstrip('/')}/{key}"

        async def create() -> bool:
            try:
                await fs._pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True

        try:
            return run(create(), where, store)
        except OSError as exc:
            if "NotImplemented" not in str(exc) and getattr(exc, "errno", None) != 38:
                raise
            # An S3-compatible server without conditional puts: the check-then-put below.
    buf = default_buffer_prototype().buffer.from_bytes(data)
    run(store.set_if_not_exists(key, buf), where, store)
    return read_bytes(store, key, where) == data


def write_store(
    location: Any,
    write: Callable[[Store], None],
    *,
    overwrite: bool,
    storage_options: dict[str, Any] | None = None,
    replaceable: Callable[[dict[str, Any]], str | None],
) -> None:
    """Write a Zarr store at a URL or into a store object so that it appears complete or not at all.

    The protocol is the module docstring's: marker (refused while another
    writer's is there and not stale), old root deleted, arrays, root
    metadata last (only while the marker is still this write's, and only
    where no root metadata is), marker deleted.

    Parameters
    ----------
    location : str or zarr store
        A URL, or a store object (written at its root).
    write : callable
        ``write(store)`` writes the Zarr store (xarray's ``to_zarr``).
    overwrite : bool
        Replace an existing store (only one ``replaceable`` accepts).
    storage_options : dict, optional
        Backend options of a URL.
    replaceable : callable
        ``replaceable(attrs)``: None when a store with these root attributes
        may be replaced, else what it holds, in words.

    Raises
    ------
    FileExistsError
        A store is there and ``overwrite`` is false; another write to the
        place is in progress; or another writer took the place over or
        committed there while this write ran (then nothing of this write
        is committed).
    ValueError
        What is there may not be replaced (not a streamem store, objects
        that are not a Zarr store).
    """
    where = describe(location)
    store = open_store(location, storage_options)
    state, attrs = _check_place(store, where, overwrite, replaceable)
    marker = _acquire(store, where)
    try:
        # Looked at again now that the place is this write's: a store committed meanwhile is not replaced unasked.
        state, attrs = _check_place(store, where, overwrite, replaceable)
    except BaseException:
        _release(store, where, marker)
        raise
    if state == "store":
        run(store.delete(ROOT), where, store)  # from here on readers see no store
    for name in entries(store, where):  # the old store's objects, or what an interrupted write left
        if name != WRITING:
            remove(store, name, where)
    deferred = DeferredRootStore(store, marker=marker, where=where)
    try:
        write(deferred)
        deferred.commit(where)
    except BaseException as exc:
        _clean_up(store, where, marker)
        if is_storage_error(exc) and not isinstance(exc, OSError):
            raise storage_error(exc, f"cannot write {where}", store) from None
        raise
    _release(store, where, marker)


def _check_place(
    store: Store, where: str, overwrite: bool, replaceable: Callable[[dict[str, Any]], str | None]
) -> tuple[str, dict[str, Any] | None]:
    """What is at the place of a write, refused unless it is empty, debris, or a store that may be replaced."""
    state, attrs = store_state(store, where)
    if state == "store" and not overwrite:
        raise FileExistsError(f"{where!r} exists; pass overwrite=True (--overwrite) to replace it")
    if state == "store" and attrs is not None and replaceable(attrs) is not None:
        raise ValueError(replaceable_message(where, replaceable(attrs)))
    if state == "foreign":
        raise ValueError(f"{where!r} holds objects that are not a Zarr store; streamem writes only to an empty place "
                         "or replaces its own stores: remove them yourself or write elsewhere")  # fmt: skip
    return state, attrs


def _acquire(store: Store, where: str) -> dict[str, Any]:
    """Put this write's marker, or take over an abandoned one; refuse while another write is in progress.

    Raises
    ------
    FileExistsError
        Another writer's marker is there and not stale (:func:`marker_is_stale`).
    """
    marker = new_marker()
    data = json.dumps(marker).encode()
    if put_new(store, WRITING, data, where):
        return marker
    other = read_marker(store, where)
    if other and not marker_is_stale(other):
        since = max(0.0, time.time() - float(other.get("started", time.time())))
        raise FileExistsError(
            f"{where!r} is being written by another streamem process (pid {other.get('pid')} on "
            f"{other.get('host')!r}, for {since:.0f} s); writing there is refused until that write ends. If no "
            f"process writes there any more, its marker {WRITING!r} counts as abandoned {STALE_AFTER:g} s after its "
            "last heartbeat (at once when that process ran on this host and has ended), or delete that object yourself"
        )
    write_bytes(store, WRITING, data, where)  # an abandoned (or unreadable) marker: this write takes over
    return marker


def _owns(store: Store, where: str, marker: dict[str, Any]) -> bool:
    """Whether the marker at the place is still this write's."""
    return read_marker(store, where).get("token") == marker["token"]


def _release(store: Store, where: str, marker: dict[str, Any]) -> None:
    """Delete the marker if it is still this write's (a writer that took over keeps its own)."""
    if _owns(store, where, marker):
        run(store.delete(WRITING), where, store)


def _clean_up(store: Store, where: str, marker: dict[str, Any]) -> None:
    """Remove what a failed write left (best effort: a later write removes it too, the marker says whose it is);
    nothing when another writer has taken the place over (what is there is its)."""
    try:
        if not _owns(store, where, marker):
            return
        if read_bytes(store, ROOT, where) is not None:  # another writer committed: leave its store, drop the marker
            run(store.delete(WRITING), where, store)
            return
        for name in entries(store, where):
            if name != WRITING:
                remove(store, name, where)
        run(store.delete(WRITING), where, store)
    except Exception:
        pass


def replaceable_message(where: str, held: str) -> str:
    """The refusal to replace something streamem did not write (as ``io.check_replaceable`` words it)."""
    from streamem.io import STREAMEM_FORMATS

    return (f"{where!r} holds {held}, not a store written by streamem; overwrite=True (--overwrite) replaces only "
            f"streamem's own stores (format attribute one of {list(STREAMEM_FORMATS)}): remove it yourself or write elsewhere")  # fmt: skip


def identity(store: Store, where: str) -> bytes | None:
    """What changes when a store is replaced: its root metadata (None: no store)."""
    return read_bytes(store, ROOT, where)


#: Requests a copy has in flight at once.
_CONCURRENCY = 16


async def _copy_keys(source: Store, target: Store, keys: list[str]) -> None:
    """Copy ``keys`` of ``source`` to ``target``, many requests at once (latency, not bandwidth, bounds small stores)."""
    import asyncio

    prototype = default_buffer_prototype()
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def one(key: str) -> None:
        async with limit:
            value = await source.get(key, prototype)
            if value is not None:
                await target.set(key, value)

    await asyncio.gather(*(one(key) for key in keys))


def upload(source: Store, target: Store, where: str) -> None:
    """Copy every object of ``source`` (an in-memory store) to ``target`` concurrently; the root metadata last.

    With a :class:`DeferredRootStore` target the root is held back for its commit anyway; the order
    here keeps any other target complete-or-absent too.
    """

    async def copy() -> None:
        keys = [key async for key in source.list()]
        await _copy_keys(source, target, [key for key in keys if key != ROOT])
        await _copy_keys(source, target, [key for key in keys if key == ROOT])

    run(copy(), f"cannot write {where}", target, timeout=None)


def download(store: Store, where: str) -> Store | None:
    """Every object of a small store, read concurrently into memory; None when the store cannot list its keys
    (``https://``) - then it is read as it is. The root metadata is read first: objects of a store replaced
    meanwhile are told apart by its checksums and identity (see ``io.open_dataset``)."""
    from zarr.storage import MemoryStore

    memory = MemoryStore()

    async def copy() -> bool:
        try:
            keys = [key async for key in store.list()]
        except (NotImplementedError, FileNotFoundError):
            return False
        await _copy_keys(store, memory, [key for key in keys if key == ROOT])
        await _copy_keys(store, memory, [key for key in keys if key != ROOT])
        return True

    if not store.supports_listing:
        return None
    try:
        return memory if run(copy(), where, store, timeout=None) else None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, ConnectionError, TimeoutError)):
            raise
        return None  # e.g. an http server that cannot list
