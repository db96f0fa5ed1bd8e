"""The run folder, owned by the driver: a local path or a URI that pyarrow's filesystems understand
(file://, s3://, gs://, hdfs://).

Every output reaches it from the driver: learners hand checkpoints and the final adapter over as
bytes through Ray's object store, evaluation records come back from the rollout workers, so no
node needs to see another's disk. On a local filesystem a folder appears through one rename (its
existence means it is complete); on object stores, where renames are copies, the files are written
in place with the completion marker (trainer_state.json) last.
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path


class RunFolder:
    def __init__(self, location: str, filesystem=None):
        """`filesystem`: a pyarrow FileSystem to use with `location` as its path (tests)."""
        from pyarrow import fs

        self.location = str(location)
        if filesystem is not None:
            self.fs, self.root = filesystem, self.location
        elif "://" in self.location:
            self.fs, self.root = fs.FileSystem.from_uri(self.location)
        else:
            self.fs, self.root = fs.LocalFileSystem(), str(Path(self.location).expanduser().resolve())
        self.is_local = isinstance(self.fs, fs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)

    def __str__(self) -> str:
        return self.root if self.is_local else self.location

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> Path | None:
        """The same place as a local Path (None on remote filesystems)."""
        return Path(self.path(rel)) if self.is_local else None

    def uri(self, rel: str = "") -> str:
        """Where `rel` is, as a user would write it (a path when local)."""
        return self.path(rel) if self.is_local else posixpath.join(self.location, rel)

    # ---------------------------------------------------------------- files
    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type != fs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        from pyarrow import fs

        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(fs.FileSelector(self.path(rel)))
        return sorted(posixpath.basename(i.path) for i in infos)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-file write; atomic on a local filesystem (a temp file, then a rename)."""
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
        dest = tmp if self.is_local else target
        with self.fs.open_output_stream(dest) as f:
            f.write(data)
        if self.is_local:
            self.fs.move(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def append_text(self, rel: str, text: str) -> None:
        """Append (local); read and rewrite where the filesystem has no append (object stores)."""
        if self.is_local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(text)
            return
        old = self.read_text(rel) if self.exists(rel) else ""
        self.write_text(rel, old + text)

    def write_files(self, rel: str, files: dict[str, bytes], last: str | None = None) -> str:
        """A folder of files, replacing any folder there. Local: written to a temp folder and renamed,
        so it appears complete or not at all. Elsewhere: written in place, `last` (the completion
        marker) after every other file."""
        target = self.path(rel)
        parent = posixpath.dirname(target)
        order = sorted(files, key=lambda name: name == last)
        if self.is_local:
            tmp = posixpath.join(parent, f".{posixpath.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
            self.fs.create_dir(tmp, recursive=True)
            for name in order:
                with self.fs.open_output_stream(posixpath.join(tmp, name)) as f:
                    f.write(files[name])
            if self.exists(rel):
                self.fs.delete_dir(target)
            self.fs.move(tmp, target)
        else:
            if self.exists(rel):
                self.fs.delete_dir(target)
            self.fs.create_dir(target, recursive=True)
            for name in order:
                with self.fs.open_output_stream(posixpath.join(target, name)) as f:
                    f.write(files[name])
        return self.uri(rel)

    def read_files(self, rel: str) -> dict[str, bytes]:
        return {name: self.read_bytes(posixpath.join(rel, name)) for name in self.listdir(rel)
                if not name.startswith(".")}
