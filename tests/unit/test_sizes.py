import pytest

from thinstack.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [("512", 512), ("4K", 4096), ("1.5G", 3 << 29),
                                        ("10GiB", 10 << 30), ("100m", 100 << 20), ("8s", 4096),
                                        ("2TB", 2 << 40)])
def test_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.3", "ten", "1X"])
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format():
    assert format_size(0) == "0B"
    assert format_size(1536) == "1.5KiB"
    assert format_size(256 << 20) == "256MiB"
