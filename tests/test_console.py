"""The console's progress line and stage lines (no Ray needed)."""
import io
import pickle
import sys

from training import console


def test_bar_line_shows_progress_rate_and_eta():
    bar = console.Bar("  train", 100, "steps")
    assert bar.line(50, "epoch 1/2", rate=10.0) == "  train [##########..........] 50/100 steps  epoch 1/2  ETA 5 s"
    assert bar.line(100, "done").endswith("100/100 steps  done")  # finished: no ETA
    assert "ETA 4.2 min" in bar.line(50, rate=0.2)


def test_bar_without_a_terminal_prints_rarely_and_survives_pickling(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = console.Bar("  search", 8, "trials")
    clock = [1000.0]
    monkeypatch.setattr(console.time, "time", lambda: clock[0])
    bar.t0 = clock[0]
    for i in range(1, 8):  # work that would end within the interval prints no progress line at all
        clock[0] += 1
        bar.update(i)
    assert out.getvalue() == ""
    clock[0] += console.PRINT_EVERY_S
    bar.update(7.5, "best valid AUC 0.71")
    bar.update(7.6)  # again within the interval: nothing more
    assert out.getvalue().count("\n") == 1 and "7.5/8 trials  best valid AUC 0.71" in out.getvalue()
    bar.close("search: 8 trials")
    assert out.getvalue().endswith("search: 8 trials\n")
    assert pickle.loads(pickle.dumps(bar)).label == "  search"  # Tune pickles its callbacks, bars inside


def test_step_prints_one_line_and_nothing_on_failure(capsys):
    with console.step("encode") as st:
        st["done"] = "1,000 rows"
    assert capsys.readouterr().out.startswith("encode: 1,000 rows in ")
    try:
        with console.step("encode"):
            raise ValueError("bad column")
    except ValueError:
        pass
    assert capsys.readouterr().out == ""


def test_verbose_is_an_explicit_setting(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose()
