"""The training's progress as the flow shows it: the terminal bar, and the progress artifact's value and text."""

import io
import sys

from leantune.progress import TrainingBar, training_percent, training_progress_text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def step_line(step: int, elapsed_s: float) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 12345.6, "micro_batch_size": 4,
            "elapsed_s": elapsed_s}


def test_the_bar_draws_steps_loss_and_tokens_per_s_on_a_terminal_and_nothing_elsewhere(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = TrainingBar(462)
    bar.update([step_line(1, 1.0), step_line(2, 2.0)])
    bar.update([step_line(31, 31.0)])
    bar.close()
    drawn = terminal.getvalue()
    assert "31/462" in drawn
    assert "loss 0.0323, 12,346 tokens/s" in drawn

    log_file = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log_file)
    bar = TrainingBar(462)
    bar.update([step_line(1, 1.0)])
    bar.close()
    assert log_file.getvalue() == ""


def test_a_resumed_attempt_starts_its_bar_at_the_checkpoint(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = TrainingBar(100)
    bar.update([step_line(51, 3.0)])
    bar.close()
    assert "51/100" in terminal.getvalue()
    assert " 0/100" not in terminal.getvalue()


def test_the_progress_value_is_rounded_and_the_text_says_step_total_and_eta():
    assert training_percent(35, 462) == 7.6
    assert training_percent(462, 462) == 100.0
    steps = [step_line(1, 10.0), step_line(31, 70.0)]  # 2 s a step
    assert training_progress_text(steps, 462) == ("Training: step 31 of 462, ETA 14:22; loss 0.0323, "
                                                  "12,346 tokens/s")
    assert training_progress_text(steps[:1], 462).startswith("Training: step 1 of 462; loss")  # no pace yet
