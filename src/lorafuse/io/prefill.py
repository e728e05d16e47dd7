"""Start writing the merged model before its plan exists: every base tensor's bytes copied to its output place.

Where the time goes: filling fresh page cache with the output costs about what ``cp -r`` of the model costs,
while overwriting pages that already exist is several times cheaper. So the merge pipeline (merger.py, for every
entry point) guesses the output layout from the base's headers alone (dtype auto: the output holds the base's
tensors in the base's order), creates the merge's temporary output folder and, in a background thread, copies
every base tensor to its output offset with ``copy_file_range`` while the main thread reads the adapters and
builds the plan. The pipeline then compares the plan's layout with the guess: when the shard names and header
bytes are identical, untouched tensors are already in place and merged tensors overwrite their pages once the
prefill has passed them (io/writer.py); otherwise the prefill is stopped and its files removed before the kernel
writes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import LorafuseError, OutputError
from .layout import Slot, layout_shards, parse_size, safetensors_header, shard_names
from .model_files import find_model_weights
from .output import AtomicOutput, OutputState, check_output, describe_os_error
from .safetensors_header import read_raw_header
from .writer import copy_piece, file_lock


def file_id(path: Path | str) -> tuple[int, int]:
    """(device, inode) of a file: the same file whatever path names it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Prefill:
    """A background copy of base tensor bytes into the shards of a guessed output layout.

    ``names[i]`` is the file name of shard ``i`` and ``headers[i]`` its exact header bytes; ``slots`` lists every
    tensor in output order with its shard and absolute offset; ``sources`` maps a tensor name to the (file id,
    offset) of the base bytes copied into its slot. ``output`` is the merge's :class:`AtomicOutput` whose
    temporary folder ``tmp`` is (the merge adopts it); :meth:`discard` removes it. ``on_copy(name, nbytes)`` is
    told of every chunk copied (the merge's progress bar).
    """

    def __init__(
        self,
        tmp: Path,
        names: list[str],
        headers: list[bytes],
        slots: list[Slot],
        sources: dict[str, tuple[Path, int]],
        base_files: list[Path] | None = None,
        prefix: str = "model",
        output: AtomicOutput | None = None,
        on_copy: Callable[[str, int], None] | None = None,
    ):
        self.tmp = tmp
        self.on_copy = on_copy  # (tensor name, bytes) after each chunk copied, from the copy thread: progress
        self.output = output
        self.base_files = list(base_files or [])  # the base's weight files (not copied as extra files)
        self.prefix = prefix  # shard name prefix ("model", "diffusion_pytorch_model")
        self.names = names
        self.headers = headers
        self.slots = slots
        self._sources = sources
        self._file_ids = {path: file_id(path) for path, _ in sources.values()}
        self._order = {slot.name: i for i, slot in enumerate(slots)}
        self.used = False  # set when the merge adopted the files
        self._done = 0  # slots[:_done] are copied
        self._error: BaseException | None = None
        self._cancelled = False
        self._skip: set[str] = set()  # slots the merge rewrites whole: not copied (once the plan says so)
        self._skip_from = 0  # slots from this index on see the skip set when the copy reaches them
        self._skipped: set[str] = set()
        self._created: list[Path] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> Prefill:
        """Create the shard files (header written, full size) here, so they exist once this returns; then copy."""
        fds: list[int] = []
        try:
            for name, head, shard_slots in zip(self.names, self.headers, self._by_shard()):
                path = self.tmp / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._created.append(path)
                fds.append(fd)
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + sum(s.nbytes for s in shard_slots))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._thread = threading.Thread(target=self._run, args=(fds,), name="lorafuse-prefill", daemon=True)
        self._thread.start()
        return self

    def _run(self, fds: list[int]) -> None:
        sources: dict[Path, int] = {}
        try:
            for i, slot in enumerate(self.slots):
                with self._cond:
                    skip = slot.name in self._skip
                    if skip:
                        self._skipped.add(slot.name)
                if not skip:
                    src_path, src_offset = self._sources[slot.name]
                    if src_path not in sources:
                        sources[src_path] = os.open(src_path, os.O_RDONLY)
                    if not self._copy(
                        slot.name, sources[src_path], src_offset, fds[slot.shard], slot.offset, slot.nbytes
                    ):
                        return  # cancelled
                with self._cond:
                    self._done = i + 1
                    self._cond.notify_all()
        except BaseException as exc:  # reported by wait_for / finish on the merge's threads
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            for fd in [*fds, *sources.values()]:
                os.close(fd)

    def _by_shard(self) -> list[list[Slot]]:
        shards: list[list[Slot]] = [[] for _ in self.names]
        for slot in self.slots:
            shards[slot.shard].append(slot)
        return shards

    def _copy(self, name: str, src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> bool:
        lock, done = file_lock(dst), 0
        while done < nbytes:
            if self._cancelled:
                return False
            n = copy_piece(src, src_offset + done, dst, dst_offset + done, nbytes - done, lock)
            done += n
            if self.on_copy is not None:
                self.on_copy(name, n)
        return True

    def matches(self, names: list[str], headers: list[bytes]) -> bool:
        """True when the plan's shard names and header bytes are exactly the guessed ones."""
        self.used = names == self.names and headers == self.headers
        return self.used

    def skip(self, names: set[str]) -> None:
        """Do not copy the slots of ``names`` (the merge writes them whole) where the copy has not reached them.

        The bytes a merge rewrites would otherwise be copied once and written again: the kernel writes them into
        fresh pages instead (:meth:`skipped` tells which).
        """
        with self._cond:
            self._skip |= set(names)
            self._skip_from = max(self._skip_from, self._done + 1)  # slot _done may be being copied right now

    def skipped(self, name: str) -> bool:
        """True when the slot of ``name`` is left out of the copy (:meth:`skip`): its pages are fresh."""
        with self._cond:
            return name in self._skipped or self._will_skip(name)

    def _will_skip(self, name: str) -> bool:
        """The copy has not reached the slot of ``name`` yet and will skip it (caller holds the condition)."""
        return name in self._skip and self._order[name] >= self._skip_from and self._error is None

    def source(self, name: str) -> tuple[Path, int]:
        """The base file and offset whose bytes go into the slot of ``name``."""
        return self._sources[name]

    def holds(self, name: str, path: Path | str, offset: int) -> bool:
        """True when the slot of ``name`` receives the base bytes at ``offset`` of ``path``."""
        source = self._sources.get(name)
        return source is not None and source[1] == offset and self._file_ids[source[0]] == file_id(path)

    def wait_for(self, name: str) -> None:
        """Block until the slot of ``name`` is copied, so that writing it afterwards is not overwritten."""
        index = self._order[name]
        with self._cond:
            if self._will_skip(name):
                return  # never copied: nothing to wait for (the merge writes it into fresh pages)
            self._cond.wait_for(lambda: self._done > index or self._error is not None)
        self._raise()

    def finish(self) -> None:
        """Wait for the whole copy; its failure (disk full, I/O error) is raised here."""
        if self._thread is not None:
            self._thread.join()
        self._raise()

    @property
    def checked(self) -> OutputState | None:
        """What the output path held when the prefill checked it (what the final rename may replace)."""
        return self.output.checked if self.output is not None else None

    def _raise(self) -> None:
        if self._error is not None:
            exc = self._error
            if isinstance(exc, LorafuseError):
                raise exc
            if isinstance(exc, OSError):  # disk full, read-only disk: the path, the reason, the fix
                where = self.output.final if self.output is not None else self.tmp
                raise OutputError(describe_os_error(exc, where)) from exc
            raise LorafuseError(f"writing the output failed: {exc}") from exc

    def cancel(self) -> None:
        """Stop copying and remove the files written so far (the temporary folder stays)."""
        self._cancelled = True
        if self._thread is not None:
            self._thread.join()
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()

    def discard(self) -> None:
        """Stop and remove the temporary folder if the merge did not turn it into the output."""
        self.cancel()
        if self.tmp.is_dir():
            if self.output is not None:
                self.output.abort()
            else:
                AtomicOutput.remove(self.tmp)


def speculate(
    base: str | Path,
    output: str | Path,
    max_shard_size: str | int,
    overwrite: bool,
    inputs: list[str | Path] | tuple[str | Path, ...] = (),
    on_copy: Callable[[str, int], None] | None = None,
) -> Prefill | None:
    """Start a prefill for merging into ``output`` from the base model folder ``base``; None when it cannot apply.

    ``inputs``: the other inputs (adapters); those that are local paths are checked against ``output`` too.
    ``on_copy``: see :class:`Prefill`.
    Never raises for bad input: the merge itself reports it. Applies to local folders of safetensors shards only,
    and to outputs whose parent folder exists (missing parents are created only once the inputs are validated).
    """
    try:
        base_dir = Path(base)
        output = Path(output)
        if not base_dir.is_dir() or not output.absolute().parent.is_dir():
            return None
        local = [Path(p) for p in inputs if Path(p).exists()]
        checked = check_output(output, overwrite, [base_dir, *local])
        files, prefix, _index = find_model_weights(base_dir)
        if not files or any(f.suffix != ".safetensors" for f in files):
            return None
        slots: list[Slot] = []
        sources: dict[str, tuple[Path, int]] = {}
        for path in files:
            entries, _metadata = read_raw_header(path)
            for entry in entries:
                if entry.name in sources:
                    return None  # a duplicate tensor: the merge reports it
                slots.append(Slot(entry.name, entry.dtype, entry.shape, entry.nbytes))
                sources[entry.name] = (path, entry.offset)
        shards = layout_shards(slots, parse_size(max_shard_size))
        names = shard_names(prefix, len(shards), ".safetensors")
        headers = [safetensors_header(shard) for shard in shards]
        folder = AtomicOutput(output, checked=checked)  # the merge writes into (adopts) its temporary folder
        try:
            return Prefill(folder.tmp, names, headers, slots, sources, files, prefix, folder, on_copy).start()
        except BaseException:
            folder.abort()
            raise
    except (LorafuseError, OSError, ValueError):
        return None
