"""Executed matmul FLOPs of a compiled XLA program, loops included.

`Compiled.cost_analysis()["flops"]` counts a while loop's body once, whatever its trip count, so for a program
whose layers run as one `scan` (`scan_layers`), or whose latent steps are a scan, it undercounts by the number of
layers. This reads the optimized HLO text (`Compiled.as_text()`) instead: every `dot` costs
2 x (result elements) x (contracted size), and counts as many times as its computation runs, i.e. the product of
the known trip counts of the while loops around it (XLA records `known_trip_count` on a while whose count it
proved; a while without one is an error rather than a guess). Only dots are counted: they are what model FLOPs
(`vital.accounting`) count, and elementwise work is negligible beside them at model sizes.

The HLO text reader (`computations`, `callees`, `INSTRUCTION`, `KNOWN_TRIP_COUNT`) is public: `xla_collectives`
reads the same text with it.
"""

from __future__ import annotations

import collections
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
# One instruction line: (result name, result shape, opcode, the rest from the operands on).
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\w+\[[\d,]*\])\S* ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class HloFlopsError(ValueError):
    """The HLO has a construct whose executed count cannot be read (a while loop without a known trip count)."""


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def computations(hlo_text: str) -> tuple[dict, str]:
    """{name: (param shapes {name: dims}, instruction lines)} in file order, and the ENTRY computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = ({name: _dims(dims) for name, dims in _PARAM.findall(header.group(2))}, [])
            if line.startswith("ENTRY "):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            comps[current][1].append(line)
    if entry is None:
        raise HloFlopsError("no ENTRY computation in the HLO text")
    return comps, entry


def callees(line: str) -> list[tuple[str, int]]:
    """(computation, times per execution of `line`) for every computation the instruction calls."""
    called = [(name, kind) for kind, name in _CALLS.findall(line)]
    for kind, names in _CALL_LISTS.findall(line):
        called += [(n.strip().lstrip("%"), kind) for n in names.split(",") if n.strip()]
    out = []
    for name, kind in called:
        if kind in ("body", "condition"):
            trip = KNOWN_TRIP_COUNT.search(line)
            if trip is None:
                raise HloFlopsError(f"while loop without a known trip count: {line.strip()[:200]}")
            out.append((name, int(trip.group(1)) + (kind == "condition")))
        else:
            out.append((name, 1))
    return out


def _dot_flops(operands: str, attrs: str, result_dims: tuple[int, ...], shapes: dict) -> float:
    names = re.findall(r"%([\w.\-]+)", operands)
    inline = re.findall(r"\w+\[([\d,]*)\]\S* %", operands)  # operands printed with their shapes
    lhs = _dims(inline[0]) if inline else shapes.get(names[0]) if names else None
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    if lhs is None or contracting is None:
        raise HloFlopsError(f"cannot read the operands of a dot: {operands[:200]}")
    contracted = math.prod(lhs[int(d)] for d in _dims(contracting.group(1)))
    return 2.0 * math.prod(result_dims) * contracted


def matmul_flops(hlo_text: str) -> float:
    """Executed dot FLOPs of the (optimized, per-device) HLO module `hlo_text`, loops counted by trip count."""
    comps, entry = computations(hlo_text)
    runs = collections.Counter({entry: 1})
    # HLO text lists a computation after everything it calls, so callers come first in reverse order.
    for name in reversed(list(comps)):
        for line in comps[name][1]:
            for callee, times in callees(line):
                runs[callee] += runs[name] * times
    total = 0.0
    for name, (params, lines) in comps.items():
        if not runs[name]:
            continue
        shapes = dict(params)
        for line in lines:
            instr = INSTRUCTION.match(line)
            if instr is None:
                continue
            result, shape, opcode, rest = instr.groups()
            if not shape.startswith("("):
                shapes[result] = _dims(shape[shape.index("[") + 1:shape.index("]")])
            if opcode == "dot":
                operands, _, attrs = rest.partition(")")
                total += runs[name] * _dot_flops(operands, attrs, shapes[result], shapes)
    return total
