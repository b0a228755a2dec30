import os
import time

import pytest

from thinstack.dm.command import (
    DEFAULT_TIMEOUT,
    RUNNER,
    CommandError,
    CommandNotFound,
    CommandTimeout,
    Runner,
    summary,
)


def test_returns_standard_output():
    assert RUNNER.run(["echo", "hello"]) == "hello\n"


def test_feeds_standard_input_as_text_or_bytes():
    assert RUNNER.run(["cat"], input="table\n") == "table\n"
    assert RUNNER.run(["cat"], input=b"\x00bytes") == "\x00bytes"


def test_runs_in_the_c_locale():
    assert RUNNER.run(["sh", "-c", "echo $LC_ALL"]) == "C\n"


def test_failure_is_one_command_error_with_a_one_line_message():
    with pytest.raises(CommandError) as caught:
        RUNNER.run(["sh", "-c", "echo partial; echo 'device-mapper: reload ioctl on x failed: "
                                "Invalid argument' >&2; echo 'Command failed.' >&2; exit 1"])
    e = caught.value
    assert (e.exit_status, e.stdout) == (1, "partial\n")
    assert "Command failed." in e.stderr
    assert e.argv[0] == "sh"
    assert str(e).endswith(": exit 1: device-mapper: reload ioctl on x failed: Invalid argument")
    assert "\n" not in str(e)


def test_a_missing_program_is_a_command_error():
    with pytest.raises(CommandError) as caught:
        RUNNER.run(["thinstack-no-such-program", "x"])
    assert isinstance(caught.value, CommandNotFound)
    assert str(caught.value) == ("thinstack-no-such-program x: program not found: "
                                 "thinstack-no-such-program")


def test_a_timeout_is_a_command_error():
    with pytest.raises(CommandError) as caught:
        RUNNER.run(["sleep", "10"], timeout=0.2)
    assert isinstance(caught.value, CommandTimeout)
    assert str(caught.value) == "sleep 10: timed out after 0.2s"


def test_a_long_command_line_is_shortened_in_the_message():
    with pytest.raises(CommandError) as caught:
        RUNNER.run(["sh", "-c", "exit 2", "x" * 500])
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("output, line", [
    ("", "(no error output)"),
    ("\n  Volume group \"vg\" not found\n  Cannot process volume group vg\n",
     "Volume group \"vg\" not found"),
    ("  WARNING: something odd\n  Failed to find logical volume\n",
     "Failed to find logical volume"),
    ("Command failed.\n", "Command failed."),
])
def test_summary_picks_the_telling_line(output, line):
    assert summary(output) == line


def test_stream_yields_large_output_in_pieces_and_reports_failure_at_the_end(capfd):
    pieces = list(RUNNER.stream(["seq", "1", "300000"], piece=1 << 16))
    assert len(pieces) > 10 and "".join(pieces) == "".join(f"{i}\n" for i in range(1, 300001))
    seen = []
    with pytest.raises(CommandError) as caught:
        for piece in RUNNER.stream(["sh", "-c", "echo early; echo 'bad metadata' >&2; exit 2"]):
            seen.append(piece)
    assert seen == ["early\n"] and caught.value.exit_status == 2
    assert str(caught.value).endswith("exit 2: bad metadata")
    assert capfd.readouterr().err == ""  # nothing printed behind the caller's back
    with pytest.raises(CommandNotFound):
        list(RUNNER.stream(["thinstack-no-such-program"]))
    with pytest.raises(CommandTimeout):
        list(RUNNER.stream(["sleep", "10"], timeout=0.2))


def test_every_command_has_a_time_limit_even_when_the_caller_names_none():
    runner = Runner(default_timeout=0.2)
    with pytest.raises(CommandTimeout) as caught:
        runner.run(["sleep", "10"])
    assert caught.value.timeout == 0.2
    with pytest.raises(CommandTimeout):
        list(runner.stream(["sleep", "10"]))
    assert RUNNER.default_timeout == DEFAULT_TIMEOUT


def test_a_stream_left_early_ends_its_program():
    stream = RUNNER.stream(["sh", "-c", "echo first; exec sleep 30"], timeout=60)
    assert next(stream) == "first\n"
    started = time.monotonic()
    stream.close()  # the consumer has read enough
    assert time.monotonic() - started < 5  # killed and reaped, not waited for


def test_passed_descriptors_reach_the_program_and_no_others(tmp_path):
    path = tmp_path / "f"
    path.write_text("secret")
    kept = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    other = os.open(path, os.O_RDONLY)  # inheritable, and still not handed on
    try:
        assert RUNNER.run(["cat", f"/proc/self/fd/{kept}"], pass_fds=[kept]) == "secret"
        with pytest.raises(CommandError):
            RUNNER.run(["cat", f"/proc/self/fd/{other}"])
    finally:
        os.close(kept)
        os.close(other)


def test_without_input_a_program_reads_nothing_and_never_waits_for_it():
    assert RUNNER.run(["cat"], timeout=5) == ""
