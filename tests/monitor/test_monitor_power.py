"""The power limit through the fake NVML: applied, read back, restored (failed runs too), no permission."""

import json
import logging

import pytest
from fakes import FakeNvml

from leantune.monitor.power import power_limit


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def fake(script=None, **kwargs):
    clock = FakeClock()
    nvml = FakeNvml(script or [{"t": 0, "power_limit_w": 115.0}], clock, **kwargs)
    nvml.nvmlInit()
    return nvml, clock


def test_limit_is_applied_read_back_and_restored():
    nvml, _ = fake()
    with power_limit(90.0, nvml, 0) as report:
        assert nvml.power_limits_w[0] == 90.0
        assert (report.status, report.previous_w, report.applied_w) == ("applied", 115.0, 90.0)
    assert nvml.power_limits_w[0] == 115.0
    assert report.restored_w == 115.0
    assert nvml.set_calls == [(0, 90.0), (0, 115.0)]
    assert report.to_dict()["target_w"] == 90.0


def test_a_request_outside_the_range_is_clamped(caplog):
    nvml, _ = fake(power_constraints_w=(100.0, 450.0))
    with caplog.at_level(logging.WARNING), power_limit(50.0, nvml, 0) as report:
        assert report.target_w == 100.0 and nvml.power_limits_w[0] == 100.0
    assert "outside GPU 0's range 100-450 W; using 100 W" in caplog.text
    assert nvml.power_limits_w[0] == 115.0


def test_a_run_that_fails_in_the_middle_still_restores_the_limit():
    nvml, _ = fake()
    with pytest.raises(RuntimeError, match="training crashed"):
        with power_limit(80.0, nvml, 0):
            assert nvml.power_limits_w[0] == 80.0
            raise RuntimeError("training crashed")
    assert nvml.power_limits_w[0] == 115.0


def test_an_interrupted_run_restores_the_limit():
    nvml, _ = fake()
    with pytest.raises(KeyboardInterrupt):
        with power_limit(80.0, nvml, 0):
            raise KeyboardInterrupt
    assert nvml.power_limits_w[0] == 115.0


def test_without_permission_it_warns_and_goes_on(caplog):
    nvml, _ = fake(can_set_power=False)
    with caplog.at_level(logging.WARNING), power_limit(90.0, nvml, 0) as report:
        assert report.status == "no_permission"
        assert nvml.power_limits_w[0] == 115.0
    assert nvml.set_calls == []  # nothing to restore
    assert "needs root" in report.message and "sudo nvidia-smi -i 0 -pl 90" in report.message
    assert "needs root" in caplog.text


def test_nvml_failing_mid_run_leaves_a_message_naming_the_reset(caplog):
    nvml, clock = fake([{"t": 0, "power_limit_w": 115.0}, {"t": 5, "error": "GPU_IS_LOST"}])
    with caplog.at_level(logging.ERROR), power_limit(90.0, nvml, 0) as report:
        clock.t = 6.0
    assert report.restored_w is None
    assert "could not restore GPU 0's power limit to 115 W" in caplog.text
    assert "sudo nvidia-smi -i 0 -pl 115" in caplog.text


def test_not_supported_and_unavailable(caplog):
    nvml, _ = fake([{"t": 0, "power_limit_w": 115.0, "unsupported": ["power_limit_w"]}])
    with caplog.at_level(logging.WARNING), power_limit(90.0, nvml, 0) as report:
        pass
    assert report.status == "not_supported" and nvml.set_calls == []
    with power_limit(90.0, None, None) as report:
        assert report.status == "unavailable" and "no limit applied" in report.message
    with power_limit(None, nvml, 0) as report:
        assert report is None


def test_a_killed_attempts_cap_is_not_taken_for_the_original(tmp_path, caplog):
    """The first attempt records 115 W before capping to 80 W and is killed (SIGKILL: no restore). The
    retry finds 80 W on the card, caps again and restores the recorded 115 W; the record is then gone."""
    record = tmp_path / "power_limit_original.json"
    nvml, _ = fake()
    killed = power_limit(80.0, nvml, 0, record=record)
    killed.__enter__()  # never left: the process died
    assert nvml.power_limits_w[0] == 80.0 and json.loads(record.read_text()) == {"uuid": "GPU-fake-0",
                                                                                  "original_w": 115.0}
    with caplog.at_level(logging.WARNING), power_limit(90.0, nvml, 0, record=record) as report:
        assert nvml.power_limits_w[0] == 90.0 and report.previous_w == 115.0
    assert "reads 80 W, left by an earlier attempt of this run; the original 115 W" in caplog.text
    assert nvml.power_limits_w[0] == 115.0 and report.restored_w == 115.0
    assert not record.exists()


def test_a_record_of_another_gpu_is_not_used(tmp_path):
    record = tmp_path / "power_limit_original.json"
    record.write_text(json.dumps({"uuid": "GPU-another-card", "original_w": 300.0}))
    nvml, _ = fake()
    with power_limit(90.0, nvml, 0, record=record) as report:
        assert report.previous_w == 115.0
    assert nvml.power_limits_w[0] == 115.0 and not record.exists()


def test_without_permission_no_record_is_left(tmp_path):
    record = tmp_path / "power_limit_original.json"
    nvml, _ = fake(can_set_power=False)
    with power_limit(90.0, nvml, 0, record=record) as report:
        assert report.status == "no_permission"
    assert not record.exists() and nvml.power_limits_w[0] == 115.0
