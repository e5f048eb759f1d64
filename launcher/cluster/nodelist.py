"""SLURM's compressed host lists: "gpu[01-04,07],cpu3" -> gpu01 gpu02 gpu03 gpu04 gpu07 cpu3.

`scontrol show hostnames` is the authority when it exists; containers often lack it, so this
parser covers the same grammar: comma-separated names, each with any number of bracketed range
lists (zero padding kept), e.g. "rack[1-2]-node[01-02]" is the cross product.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess


def expand(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_ranges(part[1:-1], nodelist))
            elif part:
                choices.append([part])
        hosts += ["".join(p) for p in itertools.product(*choices)]
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    items.append(text[start:])
    return [s for s in items if s]


def _ranges(spec: str, whole: str) -> list[str]:
    out = []
    for r in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", r.strip())
        if not m:
            raise ValueError(f"bad range {r!r} in nodelist {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {r!r} in nodelist {whole!r}")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """The first host: via `scontrol show hostnames` if available, else the parser above. The list
    is parsed here first either way: scontrol answers a malformed list with garbage and exit code 0."""
    parsed = expand(nodelist)
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parsed[0]


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE: "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"cannot read tasks per node from {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


if __name__ == "__main__":  # `python -m launcher.cluster.nodelist LIST`: the first host, for the sbatch templates
    import sys

    print(first_host(sys.argv[1]))
