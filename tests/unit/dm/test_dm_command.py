import pytest

from thinstack.dm.command import CommandError, CommandNotFound, CommandTimeout, run, summary


def test_returns_standard_output():
    assert run(["echo", "hello"]) == "hello\n"


def test_feeds_standard_input_as_text_or_bytes():
    assert run(["cat"], input="table\n") == "table\n"
    assert run(["cat"], input=b"\x00bytes") == "\x00bytes"


def test_runs_in_the_c_locale():
    assert run(["sh", "-c", "echo $LC_ALL"]) == "C\n"


def test_failure_is_one_command_error_with_a_one_line_message():
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", "echo partial; echo 'device-mapper: reload ioctl on x failed: "
                         "Invalid argument' >&2; echo 'Command failed.' >&2; exit 1"])
    e = caught.value
    assert (e.exit_status, e.stdout) == (1, "partial\n")
    assert "Command failed." in e.stderr
    assert e.argv[0] == "sh"
    assert str(e).endswith(": exit 1: device-mapper: reload ioctl on x failed: Invalid argument")
    assert "\n" not in str(e)


def test_a_missing_program_is_a_command_error():
    with pytest.raises(CommandError) as caught:
        run(["thinstack-no-such-program", "x"])
    assert isinstance(caught.value, CommandNotFound)
    assert str(caught.value) == ("thinstack-no-such-program x: program not found: "
                                 "thinstack-no-such-program")


def test_a_timeout_is_a_command_error():
    with pytest.raises(CommandError) as caught:
        run(["sleep", "10"], timeout=0.2)
    assert isinstance(caught.value, CommandTimeout)
    assert str(caught.value) == "sleep 10: timed out after 0.2s"


def test_a_long_command_line_is_shortened_in_the_message():
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", "exit 2", "x" * 500])
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
