"""Outputs captured from a real kernel by fixtures/capture.sh."""

from pathlib import Path

FIXTURES = Path(__file__).with_name("fixtures")


def captured(file: str) -> dict[str, list[str]]:
    """NAME -> the lines captured under that name in a fixtures/*.txt "NAME|LINE" file."""
    found: dict[str, list[str]] = {}
    for line in (FIXTURES / file).read_text().splitlines():
        name, _, text = line.partition("|")
        found.setdefault(name, []).append(text)
    return found


def text(file: str) -> str:
    return (FIXTURES / file).read_text()
