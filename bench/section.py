"""Rewrites one section of BENCHMARKS.md: the text between
`<!-- NAME:begin -->` and `<!-- NAME:end -->` becomes the content of FILE.
A section not there yet goes before "## History", under HEADING if given.

    python3 bench/section.py NAME FILE [HEADING]
"""
import sys

name, path_new = sys.argv[1], sys.argv[2]
heading = sys.argv[3] if len(sys.argv) > 3 else ""
new = open(path_new).read().rstrip() + "\n"
path = "BENCHMARKS.md"
text = open(path).read()
begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
if begin in text:
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    text = pre + begin + new + end + post
else:
    block = (f"## {heading}\n\n" if heading else "") + begin + new + end + "\n\n"
    marker = "## History"
    text = text.replace(marker, block + marker, 1) if marker in text else text + "\n" + block
open(path, "w").write(text)
