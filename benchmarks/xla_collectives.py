"""Bytes moved by the collectives (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) of a
compiled XLA program, per device, split into what runs once per execution of the program and what runs at every
iteration of each while loop whose trip count XLA does not know (a decode loop that stops at EOS).

It reads the optimized HLO text (`Compiled.as_text()`, one device's program) as `benchmarks.xla_flops` does:
a collective counts its result's bytes (for an all-gather the gathered array, for a reduce-scatter the local
shard), times the known trip counts of the loops around it inside the part being summed. Why: under FSDP a decode
loop that reads sharded weights all-gathers every layer's weights again at every token, which no memory figure
shows; the bytes per decode step do.
"""

from __future__ import annotations

import collections
import math
import re

from benchmarks.xla_flops import INSTRUCTION, KNOWN_TRIP_COUNT, callees, computations

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape; for a tuple (an async collective's start) its last element, the result."""
    shapes = _SHAPE.findall(shape)
    dtype, dims = shapes[-1]
    return _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


def _opcode_collective(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


def _own_bytes(lines) -> collections.Counter:
    out = collections.Counter()
    for line in lines:
        instr = INSTRUCTION.match(line)
        if instr is None:
            continue
        _, shape, opcode, _ = instr.groups()
        kind = _opcode_collective(opcode)
        if kind is not None:
            out[kind] += _shape_bytes(shape)
    return out


def collective_bytes(hlo_text: str) -> dict:
    """{"program": Counter(kind -> bytes per execution, outside loops of unknown trip count),
    "loops": {while instruction: Counter(kind -> bytes per iteration of its body)}} for one device."""
    comps, entry = computations(hlo_text)
    memo: dict[str, tuple[collections.Counter, dict]] = {}

    def visit(name: str) -> tuple[collections.Counter, dict]:
        """(bytes per execution of computation `name`, {unknown-trip while: bytes per iteration}) below it."""
        if name in memo:
            return memo[name]
        total, loops = _own_bytes(comps[name][1]), {}
        for line in comps[name][1]:
            instr = INSTRUCTION.match(line)
            if instr is not None and instr.group(3) == "while" and KNOWN_TRIP_COUNT.search(line) is None:
                per_iteration = collections.Counter()
                for part in ("condition", "body"):   # both run at every iteration
                    sub, inner = visit(re.search(rf"\b{part}=%([\w.\-]+)", line).group(1))
                    per_iteration.update(sub)
                    loops.update(inner)
                loops[instr.group(1)] = per_iteration
                continue
            for callee, times in callees(line):
                sub, inner = visit(callee)
                for kind, n in sub.items():
                    total[kind] += n * times
                loops.update(inner)
        memo[name] = (total, loops)
        return memo[name]

    program, loops = visit(entry)
    return {"program": program, "loops": loops}
