"""A full disk (issue 14): one line naming the path and the way out (free space, --resume NAME), a
non-zero exit, no traceback; also when the disk is too full for the failure file."""

import errno
import json
from pathlib import Path

from leantune.config import dump_config, load_config
from leantune.errors import no_space_left
from leantune.failures import EXIT_NO_SPACE, attempt_failure
from leantune.training import loop
from tasks.logs import failure_exit_code


def full_disk(path):
    def train(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        except OSError as e:
            raise RuntimeError("checkpoint save failed") from e
    return train


def run_dir(tmp_path):
    d = tmp_path / "myrun"
    d.mkdir()
    (d / "config.yaml").write_text(dump_config(load_config()))
    return d


def test_the_training_process_says_no_space_in_one_line(tmp_path, monkeypatch, capsys):
    d = run_dir(tmp_path)
    monkeypatch.setattr(loop, "train", full_disk(d / "checkpoints" / ".tmp-step-3" / "optimizer.pt"))
    assert loop.main([str(d), "--resume"]) == EXIT_NO_SPACE
    err = capsys.readouterr().err
    assert err == (f"leantune: no space left on device at {d}/checkpoints/.tmp-step-3/optimizer.pt; free space and "
                   "resume with --resume myrun\n")
    failure = attempt_failure(d, EXIT_NO_SPACE)
    assert str(failure) == err.removeprefix("leantune: ").strip()  # the UserError the flow ends with
    assert json.loads((d / "attempt_error.json").read_text())["user_error"] is True


def test_a_disk_too_full_for_the_failure_file_is_told_by_the_exit_status(tmp_path, monkeypatch, capsys):
    d = run_dir(tmp_path)
    monkeypatch.setattr(loop, "train", full_disk(d / "metrics.jsonl"))

    def unwritable(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(d / ".attempt_error.json.1"))

    monkeypatch.setattr(loop, "write_failure", unwritable)
    assert loop.main([str(d)]) == EXIT_NO_SPACE
    assert "Traceback" not in capsys.readouterr().err
    assert not (d / "attempt_error.json").exists()
    failure = attempt_failure(d, EXIT_NO_SPACE)
    assert str(failure) == f"no space left on device in {d}; free space and resume with --resume myrun"
    # Another exit status without a failure file: the sentence is whole.
    assert str(attempt_failure(d, 3)).endswith("without saying why; its log above may show the cause")


def test_full_disk_as_libraries_report_it():
    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')
    assert str(no_space_left(rust, "/runs/r", "r")) == ("no space left on device at /runs/r; free space and resume "
                                                        "with --resume r")
    assert no_space_left(OSError(errno.EACCES, "Permission denied"), "/runs/r") is None


def test_the_flow_script_exits_with_one_line_when_its_own_write_fails(capsys):
    class FailedState:
        def result(self):
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/attempts.jsonl")

    assert failure_exit_code(FailedState(), "run", Path("/runs/r")) == 1
    assert capsys.readouterr().err == ("leantune: no space left on device at /runs/r/attempts.jsonl; free space and "
                                       "resume with --resume r\n")
    # Without a file name the run directory is named; without a run (the evaluate flow), no --resume at all.
    assert str(no_space_left(OSError(errno.ENOSPC, "No space left on device"), Path("/runs/r"), "r")) == (
        "no space left on device at /runs/r; free space and resume with --resume r")
    assert failure_exit_code(FailedState(), "evaluation") == 1
    assert capsys.readouterr().err == ("leantune: no space left on device at /runs/r/attempts.jsonl; free space and "
                                       "run the command again\n")
