"""Readers, the writer and filesystem plumbing for local paths and s3:// (s3fs).

Images stay compressed bytes here; decoding happens in the CPU prepare stage. Filesystems are built
from ``StorageConfig`` in the driver and pickled to workers (s3fs pickles its constructor arguments),
so workers need no environment of their own.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from qzoom_ray.pipeline.config import InputConfig, OutputConfig, StorageConfig

if TYPE_CHECKING:
    import ray.data

REMOTE_SCHEMES = ("s3://", "s3a://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def fsspec_filesystem(storage: StorageConfig) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**storage.s3fs_kwargs())


def arrow_filesystem(path: str, storage: StorageConfig) -> pafs.FileSystem | None:
    """What Ray's readers/writers need for ``path``: s3fs wrapped for Arrow, or None for local paths.

    Without an explicit filesystem Ray resolves s3:// to AWS itself, ignoring custom endpoints.
    """
    if not is_remote(path):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(storage)))


def strip_scheme(path: str) -> str:
    for scheme in REMOTE_SCHEMES:
        if path.startswith(scheme):
            return path[len(scheme) :]
    return path


def input_format(cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    name = (cfg.path or "").rstrip("/").lower()
    return "jsonl" if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")) else "parquet"


def read_input(cfg: InputConfig, storage: StorageConfig) -> ray.data.Dataset:
    import ray.data

    if not cfg.path:
        raise ValueError("no input path: set input.path in the config or pass --input")
    fs = arrow_filesystem(cfg.path, storage)
    path = cfg.path
    if input_format(cfg) == "jsonl":
        # Arrow's JSON reader is newline-delimited already; Ray's lines=True path refuses a filesystem.
        return ray.data.read_json(path, filesystem=fs)
    return ray.data.read_parquet(path, filesystem=fs)


def image_root(cfg: InputConfig) -> str:
    """Base for relative image paths: the configured root, else the folder of the input file."""
    if cfg.image_root:
        return cfg.image_root
    path = (cfg.path or ".").rstrip("/")
    is_file = os.path.splitext(path)[1] != ""
    if is_remote(path):
        return posixpath.dirname(path) if is_file else path
    return os.path.dirname(os.path.abspath(path)) if is_file else os.path.abspath(path)


def resolve_uri(uri: str, root: str) -> str:
    if is_remote(uri) or os.path.isabs(uri) or uri.startswith("file://"):
        return uri.removeprefix("file://")
    return posixpath.join(root, uri) if is_remote(root) else os.path.join(root, uri)


class ImageReadError(ValueError):
    """An image path/URI that cannot be read; the message becomes the record's error."""


def read_image_bytes(uri: str, fs: Any | None) -> bytes:
    """Bytes of a local file or an s3:// object (``fs`` = the s3fs filesystem for remote URIs)."""
    try:
        if is_remote(uri):
            if fs is None:
                raise ImageReadError(f"no object-store filesystem configured for {uri}")
            return fs.cat_file(strip_scheme(uri))
        with open(uri, "rb") as fh:
            return fh.read()
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {uri}") from None
    except IsADirectoryError:
        raise ImageReadError(f"image path is a directory: {uri}") from None
    except Exception as exc:  # s3 errors come in many classes; the message is what the user needs
        raise ImageReadError(f"cannot read image {uri}: {type(exc).__name__}: {exc}") from exc


def write_output(ds: ray.data.Dataset, cfg: OutputConfig, storage: StorageConfig, schema: pa.Schema) -> None:
    assert cfg.path
    ds.write_parquet(
        cfg.path,
        filesystem=arrow_filesystem(cfg.path, storage),
        partition_cols=cfg.partition_cols or None,
        min_rows_per_file=cfg.min_rows_per_file,
        max_rows_per_file=cfg.max_rows_per_file,
        schema=schema,
    )


class OutputDir:
    """Small helper over the output folder for the resume manifest and listing written files."""

    def __init__(self, path: str, storage: StorageConfig):
        self.path = path.rstrip("/")
        self.remote = is_remote(path)
        self.fs = fsspec_filesystem(storage) if self.remote else None
        self.root = strip_scheme(self.path) if self.remote else os.path.abspath(self.path)

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str = "") -> bool:
        target = self.join(name) if name else self.root
        return self.fs.exists(target) if self.remote else os.path.exists(target)

    def read_text(self, name: str) -> str:
        if self.remote:
            return self.fs.cat_file(self.join(name)).decode()
        with open(self.join(name), encoding="utf-8") as fh:
            return fh.read()

    def write_text(self, name: str, text: str) -> None:
        if self.remote:
            self.fs.pipe_file(self.join(name), text.encode())
            return
        os.makedirs(self.root, exist_ok=True)
        tmp = self.join(name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, self.join(name))

    def parquet_files(self) -> list[str]:
        """Written data files (recursively, for partitioned output), as paths for ``open_file``."""
        if self.remote:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root)
        else:
            found = [os.path.join(d, f) for d, _, fs in os.walk(self.root) for f in fs]
        return sorted(p for p in found if p.endswith(".parquet"))

    def open(self, path: str):
        return self.fs.open(path, "rb") if self.remote else open(path, "rb")

    def remove(self, path: str) -> None:
        if self.remote:
            self.fs.rm(path)
        else:
            os.remove(path)
