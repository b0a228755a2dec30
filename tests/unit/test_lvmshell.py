"""What thinstack sends LVM's shell and how it reads the answers, without a kernel: the line
splits back into the command's words under LVM's rules, and the command log gives the status a
process would have exited with."""

from __future__ import annotations

import pytest

from tests.fakes import FakeRunner
from thinstack.errors import ThinstackError
from thinstack.lvm import Lvm
from thinstack.lvmshell import Unexplained, errors, line, status


def split(text: str) -> list[str]:
    """LVM's shell's own splitting (lvm_split in lvm2's tools/lvmcmdline.c), in Python: words at
    blanks, a word may be quoted whole by ' or ", a '#' starting a word ends the line."""
    words, i = [], 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text) or text[i] == "#":
            break
        quote = text[i] if text[i] in "'\"" else None
        i += bool(quote)
        end = i
        while end < len(text) and (text[end] != quote if quote else not text[end].isspace()):
            end += 1
        words.append(text[i:end])
        i = end + 1
    return words


@pytest.mark.parametrize("args", [
    ["lvs", "vg0"],
    ["lvcreate", "-q", "-y", "--type", "thin", "-V", "67108864b", "-n", "a.b+c_d-e", "vg0"],
    ["lvs", "-S", "lv_tags=ts_op_1 && lv_name=x", "vg0"],
    ["lvchange", "--config", 'global{thin_check_options=["-q","--clear-needs-check-flag"]}', "v"],
    ["lvs", "-S", "lv_name='x'", ""],
    ["lvs", "#not-a-comment", "a#b"],
])
def test_a_line_splits_back_into_the_commands_words_with_qq_after_the_command(args):
    assert split(line(args)) == [args[0], "-qq", *args[1:]]


@pytest.mark.parametrize("args", [
    ["lvs", "-S", "lv_name='x' || lv_name=\"y\""],  # both quotes: no way to write it
    ["lvs", "vg0\n"],  # would end the line
    ["lvs", "a\tb"],  # readline takes a tab as completion
    ["lvs", "vg\x1b"],
    ["lvs", "vgé"],  # not ASCII: readline may read it as a key with meta
    ["lvs", *["x"] * 62],  # LVM's shell takes fewer words
])
def test_what_the_shell_cannot_be_told_gets_no_line(args):
    assert line(args) is None


def log(*records: dict) -> dict:
    return {"log": list(records)}


def test_the_status_is_the_exit_status_a_process_would_have():
    ok = {"log_type": "status", "log_context": "shell", "log_ret_code": "1"}
    failed = {"log_type": "status", "log_context": "shell", "log_ret_code": "5"}
    bad_option = {"log_type": "status", "log_context": "shell", "log_ret_code": "3"}
    assert status(log(ok)) == 0
    assert status(log(failed)) == 5
    assert status(log(bad_option)) == 3
    assert status(log(ok, failed)) == 5  # the last record is the command's
    assert status({"report": []}) == 5  # no status at all: not a success


def test_errors_are_the_error_records_messages():
    doc = log({"log_type": "error", "log_message": 'Volume group "vg9" not found'},
              {"log_type": "status", "log_message": "failure", "log_ret_code": "5"},
              {"log_type": "error", "log_message": "Cannot process volume group vg9"},
              {"log_type": "error", "log_message": ""})
    assert errors(doc) == ['Volume group "vg9" not found', "Cannot process volume group vg9"]


class SilentShell:
    """A shell in which every command fails without a reason (as LVM's does after a device
    under a VG went away)."""

    def run(self, args, text, timeout=None):
        raise Unexplained(["lvm", *args], 5, "")


def test_a_report_failed_without_a_reason_is_asked_again_of_a_process():
    runner = FakeRunner().fail(["lvm", "vgs"], '  Volume group "vg0" not found\n', 5)
    lvm = Lvm(runner, SilentShell())
    assert lvm.vgs("vg0") == []  # the process's reason: not found
    assert runner.argvs[0][:2] == ["lvm", "vgs"]


def test_a_change_failed_without_a_reason_is_not_run_again():
    runner = FakeRunner()
    with pytest.raises(ThinstackError):
        Lvm(runner, SilentShell()).run("lvremove", "-q", "-y", "vg0/a")
    assert runner.calls == []
