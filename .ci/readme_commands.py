"""Print the README's two "Set up and run" commands (main job, then tests), one per line.

CI runs exactly these lines, so the README cannot drift from what is tested. The commands are
the non-comment lines of the first ```bash block under the "## Set up and run" heading; the
comment above each says which it is.
"""

import pathlib
import sys

text = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text("utf-8")
section = text.split("## Set up and run", 1)[1]
block = section.split("```bash", 1)[1].split("```", 1)[0]
commands, label = {}, None
for line in block.splitlines():
    line = line.strip()
    if line.startswith("#"):
        if label is None:
            low = line.lower()
            label = "main" if "main job" in low else "tests" if "test" in low else None
    elif line:
        if label is None or label in commands:
            sys.exit(f"README 'Set up and run': cannot tell which command {line!r} is")
        commands[label], label = line, None
if set(commands) != {"main", "tests"}:
    sys.exit(f"README 'Set up and run' must hold a main-job and a test command, got {commands}")
print(commands["main"])
print(commands["tests"])
