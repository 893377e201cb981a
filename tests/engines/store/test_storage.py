"""Directory clean-up on a local disk while other writers work in the same tree (the episode job:
commits remove their staging directories while other episodes' writes create theirs)."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.fs as pafs

from engines.store.storage import locate, remove_dir_if_empty, write_atomic


def test_remove_dir_if_empty_keeps_a_directory_with_anything_in_it(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "notes.txt").write_text("not ours")
    remove_dir_if_empty(locate(str(tmp_path / "d")))
    assert (tmp_path / "d" / "notes.txt").read_text() == "not ours"
    remove_dir_if_empty(locate(str(tmp_path / "d" / "sub")))
    assert not (tmp_path / "d" / "sub").exists()


def test_remove_dir_if_empty_of_a_missing_path_or_a_file_does_nothing(tmp_path: Path) -> None:
    remove_dir_if_empty(locate(str(tmp_path / "gone")))
    (tmp_path / "f").write_text("x")
    remove_dir_if_empty(locate(str(tmp_path / "f")))
    assert (tmp_path / "f").exists()


def test_concurrent_removals_and_writes_lose_no_file_and_raise_nothing(tmp_path: Path) -> None:
    """Each thread writes a file into root/<its dir>, deletes it and removes its directory and the
    root if empty, over and over, while the others do the same: the removals race each other (two
    removing one root) and the writes (a root removed between a writer's mkdir and its file)."""
    root = locate(str(tmp_path / "_staging"))
    fs = pafs.LocalFileSystem()
    errors: list[BaseException] = []
    kept: list[str] = []

    def work(worker: int) -> None:
        try:
            for i in range(60):
                mine = root.join(f"ep{worker}")
                path = mine.join(f"part{i}.parquet").path
                write_atomic(fs, path, b"rows")
                if i % 10 == 9:  # some files stay: a removal must never take them
                    kept.append(path)
                else:
                    fs.delete_file(path)
                remove_dir_if_empty(mine)
                remove_dir_if_empty(root)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert all(Path(p).read_bytes() == b"rows" for p in kept), "a removal deleted a file it did not own"
    assert len(kept) == 6 * 6
