"""benchmarks/results.md is shared by the benchmarks (`make bench`, `bench-data`, `bench-memory`): each owns some of
its `## ` sections (and `make bench` the title block before the first one) and rewrites only those, so running one
never erases what another measured."""

from __future__ import annotations

from pathlib import Path


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).strip("\n") + "\n")


def _section_span(lines: list[str], heading: str) -> tuple[int, int] | None:
    """Where a section stands: from its heading up to the next `## ` heading (or the end)."""
    if heading not in lines:
        return None
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def replace_section(path: Path, heading: str, body: list[str]) -> None:
    """Put `heading` and `body` in place of that section, or at the end of the file; the rest stays as it is."""
    lines = _read_lines(path)
    section = [heading, "", *body, ""]
    span = _section_span(lines, heading)
    if span is None:
        lines += ([""] if lines and lines[-1] else []) + section
    else:
        lines[span[0] : span[1]] = section
    _write_lines(path, lines)


def remove_section(path: Path, heading: str) -> None:
    """Drop a section an earlier run wrote and this one has nothing for (for example, no run failed)."""
    lines = _read_lines(path)
    span = _section_span(lines, heading)
    if span is not None:
        del lines[span[0] : span[1]]
        _write_lines(path, lines)


def replace_title_block(path: Path, block: list[str]) -> None:
    """Put `block` in place of everything before the first `## ` heading."""
    lines = _read_lines(path)
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    _write_lines(path, [*block, "", *lines[first:]])
