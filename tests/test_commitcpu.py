"""benchmarks/commitcpu.py does the work it claims: commits made through the worker's own path
in groups (none refused), by two stores taking turns too, with each statement's CPU and the WAL
frames counted.  How fast is measured by ``python -m benchmarks.commitcpu``, not here."""

from benchmarks import commitcpu
from fms.storage.meta.sqlite import SQLiteMeta


def test_commits_are_made_in_groups_through_the_workers_path_and_counted(monkeypatch):
    groups: list[int] = []
    apply = SQLiteMeta.apply

    def counted(self, changes, now, small):
        groups.append(len(changes))
        return apply(self, changes, now, small)

    monkeypatch.setattr(SQLiteMeta, "apply", counted)
    one = commitcpu.measure(3, 30, two=False, statements=True)
    assert one["cpu_ms"] > 0 and one["wall_ms"] > 0
    assert "COMMIT" in one["statements"] and "BEGIN IMMEDIATE" in one["statements"]
    assert groups.count(3) >= 10 and max(groups) == 3  # groups of 3
    # None refused: each group is made in one attempt, without a savepoint per change.
    assert not any(sql.startswith("SAVEPOINT") for sql in one["statements"])
    frames = commitcpu.measure(1, 20, two=True, statements=False, count_frames=True)
    assert frames["wal_frames"] >= 1  # each commit writes its pages to the WAL


def test_the_command_reports_each_group_size(capsys):
    assert commitcpu.main(["--groups", "1,2", "--commits", "10"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "2"]
