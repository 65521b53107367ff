"""The shared result-store core (client/run_store.py) and the three stores built on it.

Crashes are real: a child process dies with ``os._exit`` at the worst moment (mid-write, or between a
batch's parts and its commit marker); the parent then reopens the store and reads what is on disk.
Every guarantee has its negative control (the same situation without the fault, or the files read
while ignoring the rule), so a store that ignored the rule would fail here.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geneformer_triton.client.isp_store import ResultStore
from geneformer_triton.client.outputs import PartialStore
from geneformer_triton.client.run_store import (
    CommitLog,
    ResumeMismatchError,
    RunLayout,
    RunLockedError,
    atomic_write,
    open_run,
    remove_temporaries,
)
from geneformer_triton.client.shards import ShardStore, plan_shards
from geneformer_triton.core.isp_schema import IspRunError

CRASH = 86  # exit code of a child killed on purpose


def _child(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=120)


def _layout(folder: Path, lock: bool = True) -> RunLayout:
    return RunLayout(folder / "settings.json", (folder,), folder, "--restart", lock=folder / "_lock" if lock else None)


def isp_rows(cell: str, n: int) -> pd.DataFrame:
    """ISP rows of one cell with ``n`` perturbations (the store needs whole cells, not real scores); the
    crashing children run this function too (its source is sent along)."""
    import pandas as pd

    from geneformer_triton.core.isp_schema import COLUMNS

    values = {"cell_id": [cell] * n, "n_perturbations": [n] * n, "target_index": list(range(n))}
    return pd.DataFrame({c: values.get(c, [0.5] * n) for c in COLUMNS})


# ----------------------------------------------------------------------------- settings


def test_other_settings_are_refused_equal_ones_resume(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    first = open_run(_layout(folder), {"model": "m", "sizes": (1, 2)})
    assert not first.resumed
    (folder / "data").write_text("kept")
    first.close()
    again = open_run(_layout(folder), {"sizes": [1, 2], "model": "m"})  # the same settings after a JSON round trip
    assert again.resumed and (folder / "data").read_text() == "kept"
    again.close()
    with pytest.raises(ResumeMismatchError) as refused:
        open_run(_layout(folder), {"model": "other", "sizes": [1, 2]})
    message = str(refused.value)
    assert "model: stored 'm', now 'other'" in message and "--restart" in message and "another output" in message
    assert "sizes" not in message  # only what differs is named
    with pytest.raises(ResumeMismatchError, match="extra: stored None, now 1"):  # a key the stored run lacks
        open_run(_layout(folder), {"model": "m", "sizes": [1, 2], "extra": 1})
    assert (folder / "data").read_text() == "kept"  # a refused resume changes nothing
    fresh = open_run(_layout(folder), {"model": "other"}, discard=True)
    assert not fresh.resumed and not (folder / "data").exists() and (folder / "_lock").is_file()
    assert json.loads((folder / "settings.json").read_text()) == {"model": "other"}
    fresh.close()


def test_every_store_refuses_a_mismatch_with_the_shared_error(tmp_path):
    with ResultStore(tmp_path / "isp.parquet", {"perturbation": "delete"}):
        pass
    with pytest.raises(ResumeMismatchError, match="perturbation: stored 'delete', now 'overexpress'.*--overwrite") as isp:
        ResultStore(tmp_path / "isp.parquet", {"perturbation": "overexpress"})
    assert isinstance(isp.value, IspRunError)  # what `gftriton isp` callers catch
    ResultStore(tmp_path / "isp.parquet", {"perturbation": "delete"}).close()  # negative control: same settings open

    meta = {"input": "abc", "model": "m", "hidden_size": 4}
    store = PartialStore(tmp_path / "x.npy")
    store.open(meta)
    store.close()
    with pytest.raises(ResumeMismatchError, match="model: stored 'm', now 'n'.*--restart"):
        PartialStore(tmp_path / "x.npy").open({**meta, "model": "n"})

    with ShardStore(tmp_path / "o.parquet") as shards:
        shards.open({"job": "embed", "shard_size": 2})
    with pytest.raises(ResumeMismatchError, match="shard_size: stored 2, now 3"):
        ShardStore(tmp_path / "o.parquet").open({"job": "embed", "shard_size": 3})


# ----------------------------------------------------------------------------- lock


def test_a_second_writer_is_refused_and_cannot_discard(tmp_path):
    output = tmp_path / "isp.parquet"
    with ResultStore(output, {"perturbation": "delete"}) as first:
        first.append(isp_rows("a", 2), pd.DataFrame(columns=["cell_id", "error"]))
        holder = _child("""
            import sys
            from geneformer_triton.client.isp_store import ResultStore
            from geneformer_triton.client.run_store import RunLockedError
            try:
                ResultStore(sys.argv[1], {"perturbation": "delete"}, overwrite=True)
            except RunLockedError as error:
                print(error)
                sys.exit(3)
            """, str(output))
        assert holder.returncode == 3, holder.stderr[-2000:]
        assert "another run is writing" in holder.stdout
        assert len(first.read()) == 2  # the refused --overwrite deleted nothing
    embed = PartialStore(tmp_path / "e.npy")
    embed.open({"hidden_size": 1})
    with pytest.raises(RunLockedError):  # the same within one process (another open file)
        PartialStore(tmp_path / "e.npy").open({"hidden_size": 1})
    embed.close()
    PartialStore(tmp_path / "e.npy").open({"hidden_size": 1}, restart=True)  # negative control: released
    shards = ShardStore(tmp_path / "d.parquet")
    shards.open({"job": "embed", "shard_size": 2})
    with pytest.raises(RunLockedError):  # a second Dask run on the same output would sweep the first's pieces
        ShardStore(tmp_path / "d.parquet").open({"job": "embed", "shard_size": 2})
    shards.close()
    with ShardStore(tmp_path / "d.parquet") as again:  # negative control: released
        assert again.open({"job": "embed", "shard_size": 2}) == 0
    with ResultStore(output, {"perturbation": "delete"}, overwrite=True) as second:  # negative control: lock released
        assert second.read().empty


# ----------------------------------------------------------------------------- crashes


def test_a_write_killed_midway_leaves_the_old_file_and_its_temporary_is_removed(tmp_path):
    target = tmp_path / "part-1.parquet"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"old complete file"))
    killed = _child("""
        import os, sys
        from pathlib import Path
        from geneformer_triton.client.run_store import atomic_write
        def torn(tmp):
            tmp.write_bytes(b"new, but only half")
            os._exit(%d)
        atomic_write(Path(sys.argv[1]), torn)
        """ % CRASH, str(target))
    assert killed.returncode == CRASH, killed.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"new, but only half"  # the crash was mid-write
    assert leftovers[0].name.startswith(".") and leftovers[0].suffix == ".parquet"
    assert target.read_bytes() == b"old complete file"
    assert remove_temporaries(tmp_path) == 1 and sorted(tmp_path.iterdir()) == [target]


def test_a_crash_before_the_commit_leaves_the_previous_state(tmp_path):
    """Core: batch b1 committed; the child dies after writing b2's part, before its marker."""
    killed = _child("""
        import os, sys
        from pathlib import Path
        from geneformer_triton.client.run_store import CommitLog, write_bytes_atomic
        folder = Path(sys.argv[1])
        log = CommitLog(folder / "_commits")
        log.folder.mkdir(parents=True)
        write_bytes_atomic(folder / "part-b1", b"one")
        log.commit("b1")
        write_bytes_atomic(folder / "part-b2", b"two")
        os._exit(%d)
        """ % CRASH, str(tmp_path))
    assert killed.returncode == CRASH, killed.stderr[-2000:]
    parts = sorted(tmp_path.glob("part-*"))
    assert [p.name for p in parts] == ["part-b1", "part-b2"]  # negative control: b2's part is on disk
    log = CommitLog(tmp_path / "_commits")
    assert log.committed() == {"b1"} and not log.is_committed("b2")
    assert log.sweep(parts, lambda p: p.name[len("part-"):]) == 1
    assert [p.read_bytes() for p in sorted(tmp_path.glob("part-*"))] == [b"one"]


CRASHING_ISP_APPEND = "from __future__ import annotations\n" + inspect.getsource(isp_rows) + """
import os, sys
import pandas as pd
from geneformer_triton.client import run_store
from geneformer_triton.client.isp_store import ResultStore
store = ResultStore(sys.argv[1], {"perturbation": "delete"})
store.append(isp_rows("a", 3), pd.DataFrame(columns=["cell_id", "error"]))
def die(self, name, content=b""):
    os._exit(%d)
run_store.CommitLog.commit = die  # the next batch's parts are written, its marker never is
store.append(isp_rows("b", 2), pd.DataFrame([{"cell_id": "z", "error": "rejected"}]))
""" % CRASH


def test_isp_store_never_reads_an_uncommitted_batch_and_removes_it(tmp_path):
    output = tmp_path / "isp.parquet"
    killed = _child(CRASHING_ISP_APPEND, str(output))
    assert killed.returncode == CRASH, killed.stderr[-2000:]
    on_disk = pd.concat([pd.read_parquet(p) for p in output.glob("part-*.parquet")])
    assert sorted(on_disk["cell_id"].unique()) == ["a", "b"]  # negative control: b's rows part is there
    with ResultStore(output, {"perturbation": "delete"}) as store:
        assert sorted(store.read()["cell_id"].unique()) == ["a"] and len(store.read()) == 3
        assert store.read_errors().empty and store.finished() == {"a"}
    assert len(list(output.glob("part-*.parquet"))) == 1 and not list((output / "_errors").iterdir())


def test_shard_store_drops_pieces_of_a_shard_without_its_marker(tmp_path):
    output = tmp_path / "out.npy"
    killed = _child("""
        import os, sys
        import numpy as np
        from geneformer_triton.client import run_store
        from geneformer_triton.client.shards import ShardStore, plan_shards
        store = ShardStore(sys.argv[1])
        store.open({"job": "embed", "shard_size": 2})
        first, second = plan_shards(4, 2)
        store.write(first, {"embeddings": np.ones((2, 3), np.float32)})
        run_store.CommitLog.commit = lambda self, name, content=b"": os._exit(%d)
        store.write(second, {"embeddings": np.zeros((2, 3), np.float32)})
        """ % CRASH, str(output))
    assert killed.returncode == CRASH, killed.stderr[-2000:]
    store = ShardStore(output)
    assert (store.folder / "shard-00001.embeddings.npy").is_file()  # negative control: the piece was written
    first, second = plan_shards(4, 2)
    assert store.open({"job": "embed", "shard_size": 2}) == 1
    assert store.is_done(first) and not store.is_done(second)
    assert not (store.folder / "shard-00001.embeddings.npy").exists()
    np.testing.assert_array_equal(store.read(first)["embeddings"], np.ones((2, 3), np.float32))


# ----------------------------------------------------------------------------- runs written before the shared core


def test_runs_in_the_formats_written_before_resume(tmp_path):
    """Folders as the stores wrote them before run_store (hand-written here): they resume unchanged."""
    isp = tmp_path / "isp.parquet"  # ISP Parquet output from before commit markers: every part counts
    (isp / "_errors").mkdir(parents=True)
    (isp / "_genes").mkdir()
    (isp / "_run.json").write_text(json.dumps({"perturbation": "delete"}, indent=2, sort_keys=True) + "\n")
    isp_rows("a", 2).to_parquet(isp / "part-00000000000000000001-1-abcdef01.parquet", index=False)
    (isp / ".part-00000000000000000002-1-abcdef02.parquet.tmp").write_bytes(b"torn")  # the old temporary name
    with ResultStore(isp, {"perturbation": "delete"}) as store:
        assert store.finished() == {"a"}
    assert not list(isp.glob(".*"))

    partial = tmp_path / "x.npy.partial"  # PartialStore: meta.json (indent 2, unsorted) + one record
    partial.mkdir()
    meta = {"input": "abc", "model": "m", "hidden_size": 2, "n_cells": 1}
    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    payload = np.array([0], np.int64).tobytes() + np.array([[1.5, 2.5]], np.float32).tobytes()
    import struct
    import zlib

    (partial / "embeddings.bin").write_bytes(struct.pack("<4sIII", b"GFE1", 1, 2, zlib.crc32(payload)) + payload)
    store = PartialStore(tmp_path / "x.npy")
    assert store.open(meta) == 1
    np.testing.assert_array_equal(store.assemble(1), [[1.5, 2.5]])
    store.close()

    shards = tmp_path / "o.parquet.shards"  # ShardStore: _plan.json (indent 2, no newline) + a done shard
    shards.mkdir()
    (shards / "_plan.json").write_text(json.dumps({"job": "isp", "shard_size": 2}, indent=2))
    pd.DataFrame({"cell_id": ["a", "b"]}).to_parquet(shards / "shard-00000.rows.parquet", index=False)
    (shards / "shard-00000.done").write_text(json.dumps({"start": 0, "stop": 2, "pieces": {"rows": "shard-00000.rows.parquet"}}))
    store = ShardStore(tmp_path / "o.parquet")
    assert store.open({"job": "isp", "shard_size": 2}) == 1
    assert list(store.read(plan_shards(2, 2)[0])["rows"]["cell_id"]) == ["a", "b"]
