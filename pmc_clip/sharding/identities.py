"""What tells one version of a file from another without reading it: the identities a
make_shards rerun and `--merge` compare (figures under --images, shards in --output)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Collection
from typing import Any

import fsspec

from pmc_clip.storage import is_local, join

# What tells one version of a file from another without reading it, in the order looked
# for in a listing's entries: S3/Azure ETags, GCS hashes, a zip member's CRC.
_IDENTITY_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "CRC")


def file_identities(
    fs: fsspec.AbstractFileSystem, root: str, rel_paths: Collection[str]
) -> dict[str, str]:
    """A short identity of each of `rel_paths` (below `root`) that is a file: its size and
    what changes whenever it is rewritten (local: mtime and inode; object stores: the
    ETag; a zip member: its CRC). Absent paths are left out.

    Local files: one stat each (what a listing with mtimes costs anyway). Elsewhere: one
    listing of `root` (an S3 LIST returns 1,000 ETags per request, where a HEAD per file
    would cost a request each); a zip's directory is already in memory."""
    found: dict[str, str | None] = {}
    if is_local(fs):
        for rel_path in rel_paths:
            with contextlib.suppress(OSError):  # absent (or unreadable): no identity
                found[rel_path] = _stat_identity(os.stat(join(root, rel_path)))
    else:
        wanted = set(rel_paths)
        prefix = f"{root}/" if root else ""
        for _, _, files in fs.walk(root, detail=True):
            for info in files.values():
                rel_path = info["name"][len(prefix) :]
                if rel_path in wanted:
                    found[rel_path] = _info_identity(info)
        fs.invalidate_cache()  # a listing of millions of files is not kept around
    return {rel_path: identity for rel_path, identity in found.items() if identity is not None}


def object_identity(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """`file_identities`' identity of one file (None: not a file), for a file just
    written, to compare with a later listing."""
    if is_local(fs):
        return _stat_identity(os.stat(path))
    return _info_identity(fs.info(path))


def _stat_identity(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino}"


def _info_identity(info: dict[str, Any]) -> str | None:
    if info.get("type") != "file":
        return None
    version = next((f"{name}={info[name]}" for name in _IDENTITY_FIELDS if name in info), "")
    return f"size={info.get('size')} {version}".rstrip()
