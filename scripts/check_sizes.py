"""Files that show the design: no module under src/ over 600 lines, no function over 80.

An exception needs a comment saying why on the line before the ``def`` (or the module's first
line) that starts with ``# size:``. Exit 1 listing every offender."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
EXCUSE = "# size:"


def offenders(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES and not (lines and lines[0].startswith(EXCUSE)):
            found.append(f"{path}: {len(lines)} lines (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            excused = first >= 2 and lines[first - 2].strip().startswith(EXCUSE)
            if length > MAX_FUNCTION_LINES and not excused:
                found.append(f"{path}:{node.lineno}: {node.name} is {length} lines "
                             f"(limit {MAX_FUNCTION_LINES})")
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    found = offenders(root)
    for line in found:
        print(line)
    print(f"check_sizes: {len(found)} offender(s) under {root}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
